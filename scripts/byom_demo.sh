#!/usr/bin/env bash
# Bring your own model (docs/bring-your-own-model.md), end to end on a CPU in a few minutes:
#   1. a tiny ImageFolder tree: 10 classes × 20 training / 10 validation images, 64×64,
#      each class a colour and a stripe pattern (random phase, noise), so it is learnable;
#   2. a torchvision ResNet-18 trained on it by a plain PyTorch loop, as your own script
#      would, and saved as a plain state_dict;
#   3. `compaware compress` on those weights: pruned to half the MACs, fine-tuned for an
#      epoch with the trained model as the teacher (knowledge distillation), benchmarked;
#   4. `compaware export` of the result to ONNX, run in ONNX Runtime on the validation images
#      beside the trainable module (`compaware.load_model`) the run kept.
# Usage: scripts/byom_demo.sh [WORK_DIR]   (default: a new temporary folder)
set -euo pipefail
work="${1:-$(mktemp -d -t byom.XXXXXX)}"
mkdir -p "$work"
echo "working in $work"

python - "$work" <<'PY'
import colorsys
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision import transforms

work = Path(sys.argv[1])
rng = np.random.default_rng(0)
yy, xx = np.mgrid[0:64, 0:64] / 64.0
for split, count in (("train", 20), ("val", 10)):
    for c in range(10):
        folder = work / "images" / split / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        colour = np.array(colorsys.hsv_to_rgb(c / 10, 0.8, 0.9))
        angle = np.pi * (c % 5) / 5  # stripes: 5 orientations × 2 frequencies
        frequency = 3 + 3 * (c // 5)
        for i in range(count):
            phase = rng.uniform(0, 2 * np.pi)
            stripes = 0.5 + 0.5 * np.sin(2 * np.pi * frequency
                                         * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
            image = colour * stripes[..., None] + rng.normal(0, 0.1, (64, 64, 3))
            Image.fromarray((255 * image.clip(0, 1)).astype(np.uint8)).save(
                folder / f"{i}.png")

# Your own training: any script; compaware only needs the state_dict it saves. The images
# are read as compaware reads them (resized, scaled to [-1, 1]).
torch.manual_seed(0)
tf = transforms.Compose([transforms.Resize((64, 64)), transforms.ToTensor(),
                         transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
train = torchvision.datasets.ImageFolder(str(work / "images" / "train"), tf)
val = torchvision.datasets.ImageFolder(str(work / "images" / "val"), tf)
model = torchvision.models.resnet18(num_classes=10)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=8)
for epoch in range(8):
    model.train()
    for x, y in torch.utils.data.DataLoader(train, batch_size=32, shuffle=True):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    scheduler.step()
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum())
                      for x, y in torch.utils.data.DataLoader(val, batch_size=100))
    print(f"own training, epoch {epoch + 1}: val acc {100 * correct / len(val):.1f} %")
torch.save(model.state_dict(), work / "resnet18.pt")
print(f"saved {work / 'resnet18.pt'}")
PY

# Batches of 16: one fine-tuning epoch of 200 images is then 13 steps, enough for the pruned
# BatchNorm layers' running statistics to follow their new inputs.
compaware compress model=torchvision model.name=resnet18 init_from="$work/resnet18.pt" \
  data=imagefolder data.root="$work/images" compress=prune compress.target=macs:0.5 \
  finetune.distill=true schedule.finetune_epochs=1 schedule.batch_size=16 \
  hydra.run.dir="$work/run"

compaware export "$work/run" --format onnx --out "$work/resnet18_pruned.onnx"
python - "$work" <<'PY'
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torchvision
from torchvision import transforms

import compaware

work = Path(sys.argv[1])
tf = transforms.Compose([transforms.Resize((64, 64)), transforms.ToTensor(),
                         transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
val = torchvision.datasets.ImageFolder(str(work / "images" / "val"), tf)
x, y = next(iter(torch.utils.data.DataLoader(val, batch_size=len(val))))
session = ort.InferenceSession(str(work / "resnet18_pruned.onnx"),
                               providers=["CPUExecutionProvider"])
onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
with torch.no_grad():
    torch_out = compaware.load_model(work / "run" / "model_compressed.pt")(x).numpy()
print(f"ONNX Runtime on {len(val)} validation images: accuracy "
      f"{100 * float((onnx_out.argmax(1) == y.numpy()).mean()):.1f} %, largest difference "
      f"from PyTorch's logits {np.abs(onnx_out - torch_out).max():.2e}")
PY
