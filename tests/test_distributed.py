"""Two CPU processes on the gloo backend, launched by torchrun, train one model."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from train_helpers import make_cache

from napari_wsdino.core.train import load_checkpoint

WORKER = textwrap.dedent(
    """
    import os, sys
    import numpy as np, torch
    sys.path.insert(0, {tests!r})
    from train_helpers import tiny_config
    from napari_wsdino.core import train as T
    from napari_wsdino.core.dino import DINOLoss
    from napari_wsdino.core.progress import run_to_end
    from napari_wsdino.core.train import loop  # the loop looks ema_update up there

    rows, refs = [], {{}}
    batch, ema, center = T.FieldSource.batch, loop.ema_update, DINOLoss.update_center
    def spy_batch(self, r):
        rows.append(np.asarray(r).copy())
        return batch(self, r)
    def spy_ema(teacher, student, m):
        refs["teacher"], refs["student"] = teacher, student
        return ema(teacher, student, m)
    def spy_center(self, out):
        refs["loss"] = self
        return center(self, out)
    T.FieldSource.batch, loop.ema_update, DINOLoss.update_center = spy_batch, spy_ema, spy_center

    rank = int(os.environ["RANK"])
    run_to_end(T.train({cache!r}, tiny_config(epochs=2, batch_size=4), {out!r}))
    torch.save({{"student": refs["student"].state_dict(), "teacher": refs["teacher"].state_dict(),
                "center": refs["loss"].center, "rows": np.concatenate(rows).tolist()}},
               os.path.join({out!r}, f"rank{{rank}}.pt"))
    """
)


@pytest.mark.slow
def test_two_gloo_processes_train_one_model(tmp_path):
    cache = make_cache(tmp_path / "cache")
    out = tmp_path / "run"
    out.mkdir()
    script = tmp_path / "worker.py"
    tests = os.path.dirname(__file__)
    script.write_text(WORKER.format(tests=tests, cache=str(cache.path), out=str(out)))
    # The workers import this tree, not whatever an (editable) install points at.
    repo = os.path.dirname(tests)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
         "--nproc_per_node", "2", str(script)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["finished"] and ckpt["step"] == 2 * ckpt["steps_per_epoch"]
    r0 = torch.load(out / "rank0.pt", weights_only=False)
    r1 = torch.load(out / "rank1.pt", weights_only=False)
    # The sampler is sharded: each rank reads its own half of every epoch.
    assert r0["rows"] != r1["rows"]
    assert ckpt["steps_per_epoch"] == -(-ckpt["data"]["fields"] // 2) // 4
    # DDP averaged the gradients and the centre was all-reduced: both ranks hold one model.
    for key in ("student", "teacher"):
        for name, value in r0[key].items():
            assert torch.equal(value, r1[key][name]), (key, name)
            assert torch.equal(value, ckpt[key][name]), (key, name)
    assert torch.equal(r0["center"], r1["center"])
    assert torch.equal(r0["center"], ckpt["dino_loss"]["center"])
    assert not torch.equal(ckpt["teacher"]["backbone.pos_embed"],
                           ckpt["student"]["backbone.pos_embed"])  # it did train
    lines = (out / "log.jsonl").read_text().splitlines()
    assert len(lines) == 2  # rank 0 logs, once per epoch
