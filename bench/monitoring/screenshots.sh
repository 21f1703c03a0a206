#!/bin/bash
# Screenshots of TensorBoard on runs/tbdemo/sweep, taken in headless Chromium (docs/monitoring.md).
set -e
cd "$(dirname "$0")/../.." && . .venv/bin/activate
pkill -f "tensorboard --logdir" || true
tensorboard --logdir runs/tbdemo/sweep --port 6006 --host 127.0.0.1 > /tmp/tb.log 2>&1 &
sleep 10
shot() {  # name, width, height, url fragment
  timeout 120 chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --force-device-scale-factor=1 \
    --window-size=$2,$3 --virtual-time-budget=25000 --screenshot=docs/img/tb-$1.png \
    "http://127.0.0.1:6006/?darkMode=false#$4" > /dev/null 2>&1
}
shot scalars 1400 1000 "scalars&tagFilter=train%2F(loss%2Ftotal%7Cgrad_norm%7Clr%7Cepoch)%24%7Ceval%2F(accuracy%7Closs)%24"
shot custom-scalars 1400 1000 "custom_scalars"
shot images 1400 1100 "images"
shot hparams-tall 1800 3400 "hparams"
python - <<'PY'
from PIL import Image  # the table, and the Metrics/Status filters at the foot of the side panel
tall = Image.open("docs/img/tb-hparams-tall.png")
tall.crop((0, 0, 1800, 260)).save("docs/img/tb-hparams.png")
tall.crop((0, 2640, 700, 2950)).save("docs/img/tb-hparams-status.png")
PY
rm docs/img/tb-hparams-tall.png
shot text 1400 900 "text"
pkill -f "tensorboard --logdir" || true
