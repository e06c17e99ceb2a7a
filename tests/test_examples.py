"""Every script in examples/ runs offline, with a tiny random model standing in."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch
from sae_lens import SAE

from sae_lens_gated import GatedSAE
from tests.helpers import tiny_model, tiny_token_dataset

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_train_on_language_model_example(tmp_path: Path):
    example = _load("train_on_language_model")
    sae = example.train(
        model_name="tiny-random",
        hook_name="blocks.1.hook_resid_post",
        d_in=32,
        d_sae=64,
        dataset_path="",
        training_tokens=64 * 30,
        context_size=16,
        train_batch_size_tokens=64,
        output_path=str(tmp_path / "out"),
        override_model=tiny_model(),
        override_dataset=tiny_token_dataset(),
        streaming=False,
        prepend_bos=False,
        store_batch_size_prompts=8,
        n_eval_batches=1,
        checkpoint_path=str(tmp_path / "ckpt"),
    )
    loaded = SAE.load_from_disk(tmp_path / "out")
    assert type(loaded) is GatedSAE
    assert loaded.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    torch.testing.assert_close(
        loaded.W_dec.norm(dim=1), torch.ones(64), atol=1e-5, rtol=0
    )
    x = torch.randn(5, 32)
    torch.testing.assert_close(loaded(x), sae(x), rtol=1e-5, atol=1e-5)
