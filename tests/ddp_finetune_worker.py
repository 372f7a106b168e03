"""Worker of test_finetune's torchrun test: fine-tune a tiny ResNet on Fashion-MNIST on every rank.

Each rank starts from a different student (DDP must broadcast rank 0's), writes into its own
directory (only rank 0 may write anything), is interrupted by a SIGTERM that only the last rank
receives (all ranks must stop at the same step), resumes, and prints a hash of its final weights;
then runs the same fine-tuning uninterrupted and prints that hash too.

DDP_DEVICE (default cpu) picks the device (cuda: one GPU per rank, nccl); the process group is
joined even with one process.
"""
import faulthandler
import hashlib
import os
import signal
import sys
from pathlib import Path

import torch
from torch.utils.data import Subset

from leanconv.data import fashion_mnist
from leanconv.demo.teacher import SmallResNet
from leanconv.finetune import FinetuneConfig, Interrupted, finetune

out, rank, world = Path(sys.argv[1]), int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
device = os.environ.get("DDP_DEVICE", "cpu")
torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
faulthandler.dump_traceback_later(float(os.environ.get("WORKER_TIMEOUT", "200")), exit=True)  # fail, never hang
torch.set_num_threads(1)
train = Subset(fashion_mnist(train=True), range(256))
val = Subset(fashion_mnist(train=False), range(128))
cfg = FinetuneConfig(epochs=2, batch_size=16, lr=0.05, checkpoint_every_steps=3)


def say(text: str) -> None:
    os.write(1, (text + "\n").encode())  # one write: lines of the two ranks must not interleave


def build():
    torch.manual_seed(0)
    teacher = SmallResNet(widths=(8, 16, 32))
    torch.manual_seed(1 + rank)
    return teacher, SmallResNet(widths=(8, 16, 32))


def term_on_last_rank(info):
    if rank == world - 1 and info.global_step == 5:
        os.kill(os.getpid(), signal.SIGTERM)


teacher, student = build()
try:
    finetune(teacher, student, train, val, cfg, out_dir=out / f"rank{rank}", progress=False, on_step=term_on_last_rank,
             device=device, distributed=True)
    raise SystemExit("expected an interruption")
except Interrupted as e:
    say(f"INTERRUPTED rank {rank}: {e}")
teacher, student = build()
result = finetune(teacher, student, train, val, cfg, out_dir=out / f"rank{rank}", resume=True, progress=False,
                  device=device, distributed=True)


def digest(model):
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


say(f"HASH {digest(student)} rank {rank}")
resumed = student
teacher, student = build()  # the same run, uninterrupted
finetune(teacher, student, train, val, cfg, out_dir=out / f"full-rank{rank}", progress=False, device=device,
         distributed=True)
say(f"FULL {digest(student)} rank {rank}")
say(f"RESULT rank {rank} resumed_from={result.resumed_from} steps={result.steps} "
    f"agreement={result.final.agreement:.3f} backend={torch.distributed.get_backend()} "
    f"device={next(student.parameters()).device}")
