"""Training on several processes with PyTorch's own stack: `torchrun` starts them, DistributedDataParallel
averages their gradients, `DistributedSampler` splits each epoch between them.

How a papermill-run notebook hands training to torchrun: the training notebook stays one kernel. With
`nproc_per_node` > 1, `run` starts `python -m torch.distributed.run --standalone --nproc-per-node N -m
lib.distributed ...` as a child process and waits. Every worker decodes the split, prepares the model and
trains its share of each batch; only rank 0 writes (the checkpoint, the resume state, the result). The
kernel then reads rank 0's result back and renders the report as for one process. Running the notebook
itself under torchrun would have N kernels render N reports; threads inside the kernel cannot be
torchrun's processes.

The global batch stays `batch_size` (each of N processes takes batch_size / N). With no
augmentation, dropout or class weights, and BatchNorm synchronised (`sync_bn`) or absent, N processes
take the same steps as one, up to the order of floating-point sums (the test checks 2 against 1 on
the gloo backend). Otherwise they differ as two seeds do: each rank draws its own augmentation and
dropout, BatchNorm statistics are per process unless synchronised, and a class-weighted loss is
averaged per process.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    seed: int  # the DistributedSampler's shuffle seed (the same on every rank)
    sync_bn: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def init(seed: int, *, sync_bn: bool = False, device: str = "cpu") -> Dist:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR in the environment):
    gloo on CPU, nccl on CUDA."""
    import torch.distributed as td

    if "RANK" not in os.environ:
        raise RuntimeError("lib.distributed runs under torchrun (RANK and WORLD_SIZE are not set)")
    if not td.is_initialized():
        td.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank=td.get_rank(), world=td.get_world_size(), seed=seed, sync_bn=sync_bn)


def shutdown() -> None:
    """Leave the process group once every rank is done: the barrier keeps one rank from tearing gloo down
    while another still works (without it a rank could abort in teardown)."""
    import torch.distributed as td

    td.barrier()
    td.destroy_process_group()


def gather(obj):
    """Every rank's `obj`, in rank order, on every rank."""
    import torch.distributed as td

    out = [None] * td.get_world_size()
    td.all_gather_object(out, obj)
    return out


def sampler(dataset, dist: Dist, *, shuffle: bool = True):
    """This rank's share of each epoch: a permutation from (seed, epoch) cut into `world` strided
    parts, so the ranks' batches together are one process's batch of the same permutation."""
    from torch.utils.data import DistributedSampler

    return DistributedSampler(dataset, num_replicas=dist.world, rank=dist.rank, shuffle=shuffle, seed=dist.seed,
                              drop_last=True)


def shard(dataset, dist: Dist):
    """Every world-th item from this rank's index on (evaluation: no padding, each item once in all)."""
    from torch.utils.data import Subset

    return Subset(dataset, range(dist.rank, len(dataset), dist.world))


def wrap(model: torch.nn.Module, dist: Dist, device) -> torch.nn.Module:
    """DistributedDataParallel around `model` (its BatchNorm layers synchronised first when asked)."""
    from torch.nn.parallel import DistributedDataParallel

    if dist.sync_bn and str(device).startswith("cuda"):  # lib.recipes.check_processes refuses it on CPU
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [torch.device(device).index] if str(device).startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=ids)


RESULT = "launch_result.pt"


def run(P: dict, build_dir, out_dir, *, resume=None, resume_key: str = "", timeout: float | None = None) -> dict:
    """Train under torchrun with P["nproc_per_node"] processes; return rank 0's result (see `main`).

    The worker output streams through; a failed worker raises RuntimeError with torchrun's exit code."""
    import subprocess

    from lib import io

    out_dir = Path(out_dir)
    spec = out_dir / "launch_params.json"
    io.write_json_atomic(spec, {"params": P, "build_dir": str(build_dir), "resume": str(resume) if resume else "",
                                "resume_key": resume_key})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(P["nproc_per_node"]), "-m", "lib.distributed", str(spec), str(out_dir)]
    done = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun training failed (exit code {done.returncode}): {' '.join(cmd)}")
    spec.unlink()
    result = torch.load(out_dir / RESULT, map_location="cpu", weights_only=False)
    (out_dir / RESULT).unlink()
    return result


def main(argv: list[str] | None = None) -> int:
    """A torchrun worker: python -m lib.distributed <launch_params.json> <out_dir>."""
    import time

    from lib import data, engine, io, model as net, recipes

    spec_path, out_dir = (argv if argv is not None else sys.argv[1:])[:2]
    spec = io.read_json(spec_path)
    P, build = spec["params"], Path(spec["build_dir"])
    device = net.pick_device(P["device"])
    if str(device).startswith("cuda"):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist = init(P["seed"], sync_bn=P["sync_bn"], device=str(device))
    generator = engine.seed_everything(P["seed"] + dist.rank, P["deterministic"])
    labels = data.label_order(P["classes"])
    split = data.load_split(build, labels)
    parts = data.load_parts(split, ("train", "val"), labels, P, build)  # the cache the notebook filled
    prepared = recipes.prepare(P, len(labels), build_dir=build)
    started = time.perf_counter()
    trained = recipes.train_recipe(
        P, {s: parts[s].gray for s in parts}, {s: parts[s].y for s in parts}, len(labels), device=device,
        generator=generator, on_best=recipes.checkpoint_writer(P, labels, prepared, Path(out_dir) / "model.pt")
        if dist.main else None, build_dir=build, scratch_dir=build / "scratch", prepared=prepared, progress=dist.main,
        resume=spec["resume"] or None, resume_key=spec["resume_key"], dist=dist,
        groups=recipes.part_groups(parts["train"]))
    if dist.main:
        fit = trained.fit
        with io.atomic_path(Path(out_dir) / RESULT) as tmp:
            torch.save({"recipe": trained.recipe, "weights": trained.weights, "probe": trained.probe,
                        "notes": trained.notes, "seconds": time.perf_counter() - started, "world": dist.world,
                        "fit": None if fit is None else {k: getattr(fit, k) for k in (
                            "history", "best_epoch", "best_val_macro_recall", "stopped_early", "seconds", "precision",
                            "images_per_second")}}, tmp)
    shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
