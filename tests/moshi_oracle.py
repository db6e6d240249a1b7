"""Helpers to build the `moshi` reference (test-only oracle) on the same random weights as dsm."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402

from dsm.checkpoint import stack_projections  # noqa: E402
from dsm.config import lm_to_dict, parse_config  # noqa: E402
from dsm.model import LMModel  # noqa: E402


def moshi_lm_assets() -> Path:
    """Folder of Kyutai's LM test vectors: $DSM_MOSHI_ASSETS (.ci/run extracts them from the moshi sdist), else the
    shared test data beside the checkout. A missing folder fails the test: it is not optional."""
    import pytest

    shared = Path(__file__).resolve().parents[2] / "shared/testdata/moshi-lm-vectors"
    for candidate in (os.environ.get("DSM_MOSHI_ASSETS"), shared):
        if candidate and (Path(candidate) / "test_lm_model.safetensors").exists():
            return Path(candidate)
    pytest.fail("moshi LM test vectors not found: set DSM_MOSHI_ASSETS (.ci/run fetches them from the moshi sdist)")


def moshi_lm_from_config(cfg_dict: dict, seed: int = 0, dtype=torch.float32):
    """A randomly initialised moshi LMModel built the way moshi's loader builds it from a config.json dict."""
    from moshi.models import loaders

    kwargs = lm_to_dict(parse_config(cfg_dict).lm)
    if not kwargs.get("conditioners"):
        kwargs.pop("conditioners", None)
        kwargs.pop("fuser", None)
    torch.manual_seed(seed)
    model = loaders.get_moshi_lm(None, lm_kwargs=kwargs, device="cpu", dtype=dtype)
    _randomize(model, seed)
    return model.eval()


def _randomize(model, seed: int) -> None:
    """moshi leaves some weights at init values (norm alphas at 1, in_proj default); perturb all of them so that a
    wrong mapping cannot hide."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith(("alpha", "norm1.weight", "norm2.weight", "norm_cross.weight", "out_norm.weight")):
                p.copy_((1 + 0.1 * noise).to(p.dtype))
            elif name.endswith("scale"):
                p.copy_((0.5 + 0.1 * noise).to(p.dtype))
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else 1
                std = 1.0 if "emb" in name and "low_rank" not in name and "out" not in name else fan_in**-0.5
                p.copy_((noise * std).to(p.dtype))


def dsm_lm_from_moshi(cfg_dict: dict, moshi_model, dtype=torch.float32) -> LMModel:
    model = LMModel(parse_config(cfg_dict).lm)
    model.load_state_dict(stack_projections(moshi_model.state_dict()), strict=True)  # released names
    return model.to(dtype).eval()
