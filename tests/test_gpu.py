"""What only a GPU can show: bf16 training, fused AdamW, compile and NCCL DDP on real CUDA.

On a CPU machine every test here is skipped with its reason; the CPU twins of these paths
(bf16 autocast on the CPU, DDP over gloo) run in test_precision.py and test_ddp.py.
"""

from __future__ import annotations

import torch
from run_if import RunIf

from flowerdiff.infra.config import build_module
from flowerdiff.infra.devices import resolve_precision
from flowerdiff.tasks.train import train


@RunIf(min_gpus=1, bf16_cuda=True)
def test_auto_precision_is_bf16_and_training_stays_finite_on_cuda(tiny_config) -> None:
    assert resolve_precision("auto", "gpu") == "bf16-mixed"
    metrics = train(tiny_config("trainer.accelerator=gpu", "trainer.precision=auto"))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


@RunIf(min_gpus=1)
def test_adamw_is_fused_on_cuda(tiny_config) -> None:
    module = build_module(tiny_config()).cuda()
    optimizer = module.optimizer_factory(params=module.net.parameters(), **module._fused_kwargs())
    assert optimizer.defaults["fused"] is True


@RunIf(min_gpus=1)
def test_compiled_unet_matches_eager_on_cuda(tiny_config) -> None:
    module = build_module(tiny_config()).cuda().eval()
    x, t = torch.randn(2, 3, 16, 16, device="cuda"), torch.tensor([10, 500], device="cuda")
    with torch.no_grad():
        eager = module.net(x, t)
        compiled = torch.compile(module.net)(x, t)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


@RunIf(min_gpus=2)
def test_ddp_over_nccl_on_two_gpus(tiny_config) -> None:
    metrics = train(tiny_config("trainer=ddp", "trainer.accelerator=gpu", "trainer.devices=2"))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
