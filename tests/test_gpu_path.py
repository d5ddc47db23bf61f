"""The GPU code paths, checked on a CPU (issue 27): each test fails on the bug it names.

No GPU is needed: a T4's or an H100's compute capability is passed to the precision policy,
the ``meta`` device stands in for "another device than the caller's", fp16 + GradScaler run
on the CPU (torch supports both there), and the memory plan takes the free memory as a number.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from store_helpers import write_store
from vfcore import forward as fw
from vfcore import runtime
from vfcore import train
from vfcore.dissect import dissect
from vfcore.distributed import GlooSyncBatchNorm, sync_batchnorm
from vfcore.errors import InvalidParameterError
from vfcore.model import FractureNet, Preset, build_model

ROOT = Path(__file__).resolve().parents[1]
TINY = Preset("tiny", zoom=2, base=2, head=(4, 4, 2, 2), mlp=(8, 4), dropout=0.3,
              batch_size=4, patience=50, max_epochs=2)


# 2. the precision policy follows the hardware ------------------------------------------------

@pytest.mark.parametrize("capability, dtype, scaler", [
    ((7, 5), torch.float16, True),     # T4 (free Colab): torch says bf16 "supported", cuDNN does not run it
    ((7, 0), torch.float16, True),     # V100
    ((8, 0), torch.bfloat16, False),   # A100
    ((8, 9), torch.bfloat16, False),   # L4
    ((9, 0), torch.bfloat16, False),   # H100
])
def test_cuda_policy_follows_the_compute_capability(capability, dtype, scaler):
    policy = runtime.precision(torch.device("cuda"), capability=capability)
    assert (policy.dtype, policy.scaler, policy.channels_last) == (dtype, scaler, True)
    assert f"{capability[0]}.{capability[1]}" in policy.reason


def test_cpu_policy_follows_native_bf16(monkeypatch):
    monkeypatch.delenv("VFCORE_CPU_BF16", raising=False)
    cpu = torch.device("cpu")
    assert runtime.precision(cpu, native_bf16=True).dtype == torch.bfloat16
    plain = runtime.precision(cpu, native_bf16=False)
    assert (plain.dtype, plain.scaler, plain.channels_last) == (None, False, True)
    assert plain.name == "fp32 + channels_last_3d"
    assert isinstance(fw.autocast(cpu, policy=plain), type(__import__("contextlib").nullcontext()))
    # the flags Linux reports: AVX512-BF16 or AMX count, AVX-512 alone does not
    assert runtime.native_bf16_cpu(frozenset({"avx512f", "avx512_bf16"}))
    assert runtime.native_bf16_cpu(frozenset({"amx_bf16"}))
    assert not runtime.native_bf16_cpu(frozenset({"avx512f", "avx512bw", "avx2"}))
    monkeypatch.setenv("VFCORE_CPU_BF16", "0")
    assert runtime.precision(cpu).dtype is None
    monkeypatch.setenv("VFCORE_CPU_BF16", "yes")
    with pytest.raises(InvalidParameterError, match="VFCORE_CPU_BF16 must be 0 or 1; got 'yes'"):
        runtime.precision(cpu)


# 3. the engine does not move the caller's model ---------------------------------------------

def test_forward_engine_returns_the_model_to_its_device_and_layout():
    model = build_model("small")
    hu = torch.randint(-1000, 1500, (3, 96, 96, 96), dtype=torch.int16)
    from vfcore.data import to_network_input

    seen = []
    for out in fw.forward_batches(model, hu, [model.preset.dissect_layer], batch_size=2,
                                  device="meta", transform=lambda x: to_network_input(x, "small")):
        seen.append(next(model.parameters()).device.type)          # the caller's model stays put
        assert out.activations[model.preset.dissect_layer].device.type == "meta"  # the pass ran there
    assert seen == ["cpu", "cpu"]
    assert all(p.device.type == "cpu" for p in model.parameters())
    # a CPU pass in channels_last_3d leaves the caller's default layout
    fw.forward(model, hu[:1], batch_size=1, device="cpu", transform=lambda x: to_network_input(x, "small"))
    assert all(p.is_contiguous() for p in model.parameters())


def test_looking_feeds_the_model_on_its_own_device():
    """mask_gradients and occlusion put their inputs where the model is (a GPU after a pass in
    notebook 06), not on the CPU: on the meta device the whole computation stays there."""
    from vfcore.analysis import looking

    model = build_model("small").to("meta")
    layer = model.preset.dissect_layer
    devices = []
    handle = model.down_tr64.register_forward_pre_hook(lambda _m, args: devices.append(args[0].device.type))
    x = torch.rand(1, 1, 32, 32, 32)                               # a CPU input, as notebooks make
    with pytest.raises(NotImplementedError, match="meta"):        # copying a meta result out
        looking.mask_gradients(model, x, layer, [0], cells=[(0, 0, 0)])
    hu = np.zeros((96, 96, 96), np.int16)
    from vfcore.data import to_network_input
    with pytest.raises(NotImplementedError, match="meta"):
        looking.occlusion(model, lambda b: to_network_input(b, "small"), hu,
                          {"all": np.ones((96,) * 3, bool)}, fill=0.0)
    handle.remove()
    assert devices == ["meta", "meta"]


# 4. the dissection computes in fp32 whatever the device's policy ------------------------------

def test_dissection_is_fp32_under_a_half_precision_policy(monkeypatch):
    """Policy forced to bf16 (as on a GPU or a bf16 CPU): T_k is still numpy.quantile of the
    fp32 activations of a plain model call."""
    monkeypatch.setattr(fw, "precision", lambda device, **_: runtime.Precision(
        torch.bfloat16, False, True, "forced for the test"))
    torch.manual_seed(0)
    model = build_model("small").eval()
    hu = torch.randint(-1000, 1500, (6, 96, 96, 96), dtype=torch.int16)
    from vfcore.data import to_network_input
    x = to_network_input(hu, "small")
    with torch.no_grad(), fw.capture(model, model.preset.dissect_layer) as out:
        model(x)
    A = out[0].numpy()                                           # [N, K, 8, 8, 8] fp32
    d = dissect(model, hu, model.preset.dissect_layer, q_tail=0.05, batch_size=4, device="cpu",
                transform=lambda b: to_network_input(b, "small"), progress=False)
    ref = np.quantile(A.transpose(1, 0, 2, 3, 4).reshape(A.shape[1], -1), 0.95, axis=1)
    np.testing.assert_allclose(d.T, ref, rtol=1e-5, atol=1e-6)


def test_the_dissection_identity_records_the_precision():
    from vfcore.dissect import artifacts

    assert "precision" in artifacts.IDENTITY


# 5. the GPU memory plan keeps room for the training step -------------------------------------

def test_preload_keeps_room_for_the_step(monkeypatch):
    """A 16 GB T4 with 15 GB free, the paper preset at batch 64 in fp16 (12.5 GB a step): 1,000
    training patches (1.8 GB) fit beside the step, 1,500 (2.7 GB) are streamed from the host."""
    gib = 2 ** 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (15 * gib, 16 * gib))
    reserve = train.step_bytes("paper", 64, torch.float16)
    assert 11.5 * gib < reserve < 13.5 * gib

    class Split:                                                 # a lazy split: never read here
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    big = Split(1500)
    assert train.preload_split(big, torch.device("cuda"), reserve=reserve) is big
    assert train.fits_on_device(1000, 15 * gib, reserve)
    assert not train.fits_on_device(1500, 15 * gib, reserve)


@pytest.mark.parametrize("preset, batch", [("small", 16), ("paper", 2)])
def test_step_memory_estimate_against_the_tensors_autograd_keeps(preset, batch):
    """The estimate against an independent count: the distinct storages autograd saves for
    backward in one fp32 step (``saved_tensors_hooks``), plus the weights, their gradients and
    Adam's two moments. (The process's peak RSS agrees within a factor of 1.6 on the paper
    preset, but it varies from run to run with the allocator; this count does not.)"""
    torch.manual_seed(0)
    net = build_model(preset).train()
    x = torch.rand(batch, 1, *(net.preset.input_size,) * 3)
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), torch.ones(batch))
    loss.backward()
    params = sum(p.numel() for p in net.parameters())
    counted = sum(storages.values()) + 16 * params - 4 * params   # the weights themselves are saved too
    estimate = train.step_bytes(preset, batch)
    assert counted / 1.5 < estimate < counted * 1.5, (estimate, counted)


# 6. fp16 training resumes with its loss scale ------------------------------------------------

def test_fp16_scaler_state_is_saved_and_resumed(monkeypatch, tmp_path):
    """The T4 path (fp16 + GradScaler) on the CPU: a run killed after one epoch and resumed has
    the history, weights and loss scale of an uninterrupted one."""
    monkeypatch.setattr(train, "precision", lambda device, **_: runtime.Precision(
        torch.float16, True, True, "forced: the T4 path"))
    torch.set_num_threads(1)
    kwargs = dict(seed=0, batch_size=4, lr=1e-3, augment=None, device="cpu", progress=False)
    straight, resumed = write_store(tmp_path / "a", n=30), write_store(tmp_path / "b", n=30)
    train.train_seed(straight, TINY, epochs=2, **kwargs)
    train.train_seed(resumed, TINY, epochs=1, **kwargs)
    first = torch.load(resumed / "model" / "seed0" / "last.pt", weights_only=True)
    assert first["scaler"]["scale"] > 0
    train.train_seed(resumed, TINY, epochs=2, **kwargs)
    a = torch.load(straight / "model" / "seed0" / "last.pt", weights_only=True)
    b = torch.load(resumed / "model" / "seed0" / "last.pt", weights_only=True)
    assert a["scaler"] == b["scaler"]
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


# 7. the optimiser trains the synchronised batch norm ----------------------------------------

def test_the_optimiser_holds_the_synchronised_batch_norm_parameters():
    """train_seed converts batch norm before it builds the optimiser: every parameter the
    optimiser updates is one of the network's (22 of the small preset's 62 were not)."""
    torch.manual_seed(0)
    model = sync_batchnorm(FractureNet(TINY), torch.device("cpu"))
    assert any(isinstance(m, GlooSyncBatchNorm) for m in model.modules())
    opt = torch.optim.Adam(model.parameters())
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters()}
    source = Path(train.__file__).read_text()
    assert source.index("sync_batchnorm(model, dev)") < source.index("torch.optim.Adam(model.parameters()")


# 1. notebook 02's hand-written step fits a free Colab runtime --------------------------------

def _step_cell() -> str:
    nb = json.loads((ROOT / "notebooks" / "02_training.ipynb").read_text())
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    return next(c for c in cells if "optimizer.step()" in c and "loss.backward()" in c)


@pytest.mark.slow
def test_notebook_02_hand_written_step_runs_the_paper_preset_within_8_gb(tmp_path):
    """The cell, with the paper preset, in a process limited to 8 GB of address space (a free
    Colab runtime has 12.7 GB; at the preset's batch of 64 in fp32 it needed about 22 GB)."""
    store = write_store(tmp_path / "run", n=30)
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30))
        import numpy as np, torch
        from vfcore import data, model
        from vfcore.runtime import pick_device
        torch.set_num_threads(2)
        RUN, SEED, DEVICE = {str(store)!r}, 0, None
        preset = model.get_preset("paper")
    """) + _step_cell()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("step ") == 3, out.stdout


def test_notebook_02_hand_written_step_uses_the_device_and_a_small_batch():
    cell = _step_cell()
    assert "preset.batch_size]" not in cell                     # not the preset's 64
    assert ".to(device)" in cell and "DEMO_BATCH" in cell


def test_default_batch_on_a_cpu_fits_its_memory():
    """On a CPU the paper preset's batch of 64 is halved until a step needs at most half of what
    is available (8 GB: a free Colab runtime less what it uses); Binder's 2 GB keeps the small
    preset's 16; a GPU keeps the preset's (its preload plan makes room for the step)."""
    gib, cpu = 2 ** 30, torch.device("cpu")
    fp32 = runtime.Precision(None, False, True, "")
    bf16 = runtime.Precision(torch.bfloat16, False, True, "")
    # fp32: 64 -> 25 GB, 32 -> 12.7, 16 -> 6.4, 8 -> 3.3 GB (<= 4); bf16 halves the activations
    assert train.default_batch_size("paper", cpu, fp32, available=8 * gib) == 8
    assert train.default_batch_size("paper", cpu, bf16, available=8 * gib) == 16
    assert train.default_batch_size("paper", cpu, fp32, available=64 * gib) == 64
    assert train.default_batch_size("small", cpu, fp32, available=2 * gib) == 16
    assert train.default_batch_size("paper", torch.device("cuda"), available=gib) == 64
    for batch in (8, 16):
        assert train.step_bytes("paper", batch, None if batch == 8 else torch.bfloat16) <= 4 * gib
