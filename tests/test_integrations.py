"""Integrations: param_groups, Hugging Face Trainer (incl. checkpoint resume), Accelerate.

Models are built from configs (no downloads). Trainer and Accelerate runs are on CPU with
dataloader workers 0 and fixed seeds; they are deterministic, so the comparisons are exact.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

from torchcame import CAME
from torchcame.integrations import (
    came_from_training_args,
    came_kwargs_from_training_args,
    came_optimizer_cls_and_kwargs,
    is_norm_module,
    param_groups,
)

# ------------------------------------------------------------------------------ param_groups


class RMSNormLike(nn.Module):  # a transformers-style norm, recognised by its class name
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class AdaLayerNorm(nn.Module):  # a norm with a child Linear: the Linear's weight decays
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)


class PosEmbedding(nn.Module):  # a learned position embedding stored as a bare parameter
    def __init__(self, n: int, dim: int) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(n, dim))


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.pos = PosEmbedding(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, add_bias_kv=True)
        self.ln = nn.LayerNorm(8)
        self.rms = RMSNormLike(8)
        self.gn = nn.GroupNorm(2, 8)
        self.bn = nn.BatchNorm1d(8)
        self.ada = AdaLayerNorm(8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.scale = nn.Parameter(torch.ones(()))
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def _names(groups):
    return [sorted(g["param_names"]) for g in groups]


def _by_name(groups):
    return {n: g for g in groups for n in g["param_names"]}


def test_param_groups_default_rule() -> None:
    model = Tiny()
    groups = param_groups(model, weight_decay=0.05, param_names=True)
    params = [p for g in groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(params) == len({id(p) for p in params}) == len(trainable)  # each exactly once
    assert {id(p) for p in params} == trainable  # frozen ones left out
    wd = {n: g["weight_decay"] for n, g in _by_name(groups).items()}
    assert wd == {
        "embed.weight": 0.05,  # embeddings decay by default; tied head.weight appears once
        "pos.pos": 0.05,
        "attn.in_proj_weight": 0.05,
        "attn.in_proj_bias": 0.0,
        "attn.bias_k": 0.0,
        "attn.bias_v": 0.0,
        "attn.out_proj.weight": 0.05,
        "attn.out_proj.bias": 0.0,
        "ln.weight": 0.0,
        "ln.bias": 0.0,
        "rms.weight": 0.0,
        "gn.weight": 0.0,
        "gn.bias": 0.0,
        "bn.weight": 0.0,
        "bn.bias": 0.0,
        "ada.linear.weight": 0.05,
        "ada.linear.bias": 0.0,
        "proj.weight": 0.05,
        "proj.bias": 0.0,
        "scale": 0.05,
    }
    assert len(groups) == 2
    CAME(groups, lr=1e-3)  # the groups are valid CAME param groups


def test_param_groups_categories() -> None:
    model = Tiny()
    groups = param_groups(model, no_decay=("bias", "norm", "embedding"), param_names=True)
    wd = {n: g["weight_decay"] for n, g in _by_name(groups).items()}
    assert wd["embed.weight"] == wd["pos.pos"] == 0.0
    assert wd["proj.weight"] == 0.01  # the default weight_decay
    groups = param_groups(model, no_decay="vector", param_names=True)
    wd = {n: g["weight_decay"] for n, g in _by_name(groups).items()}
    assert wd["scale"] == wd["proj.bias"] == wd["ln.weight"] == 0.0
    assert wd["attn.bias_k"] == 0.01  # 3-D: not a vector
    groups = param_groups(model, weight_decay=0.1, no_decay=(), param_names=True)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.1
    with pytest.raises(ValueError, match="unknown no_decay categories"):
        param_groups(model, no_decay=("bias", "norms"))
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(model, weight_decay=-1.0)


def test_param_groups_overrides() -> None:
    model = Tiny()
    groups = param_groups(
        model,
        weight_decay=0.1,
        overrides={
            "head.*": {"lr": 1e-4},  # matches the tied weight through its second name
            re.compile(r"^attn\."): {"lr": 2e-4, "betas": (0.8, 0.99, 0.999), "weight_decay": 0.3},
            "*.bias": {"lr": 3e-4},  # first match wins: attn.*.bias stay with attn
        },
        param_names=True,
    )
    by_name = _by_name(groups)
    assert by_name["embed.weight"]["lr"] == 1e-4
    assert by_name["attn.in_proj_weight"]["weight_decay"] == 0.3
    assert by_name["attn.out_proj.bias"]["lr"] == 2e-4
    assert by_name["attn.out_proj.bias"]["weight_decay"] == 0.0  # no-decay category wins
    assert by_name["proj.bias"]["lr"] == 3e-4 and by_name["proj.bias"]["weight_decay"] == 0.0
    assert "lr" not in by_name["proj.weight"] and by_name["proj.weight"]["weight_decay"] == 0.1
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params})
    opt = CAME(groups, lr=1e-3)
    proj = next(g for g in opt.param_groups if "proj.weight" in g["param_names"])
    assert proj["lr"] == 1e-3  # groups without an override take the optimizer's default

    with pytest.raises(ValueError, match=r"\['blocks\.\*'\] match no trainable parameter"):
        param_groups(model, overrides={"head.*": {"lr": 1.0}, "blocks.*": {"lr": 1.0}})
    with pytest.raises(ValueError, match="match no trainable"):  # frozen params don't count
        param_groups(model, overrides={"frozen.*": {"lr": 1.0}})
    with pytest.raises(ValueError, match=r"\['proj.bias'\] only match parameters that an earlier"):
        param_groups(model, overrides={"proj.*": {"lr": 1.0}, "proj.bias": {"lr": 2.0}})
    with pytest.raises(ValueError, match="must not set 'params'"):
        param_groups(model, overrides={"proj.*": {"params": []}})


def test_norm_detection_by_class_name() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    assert is_norm_module(LlamaRMSNorm(8)) and is_norm_module(nn.RMSNorm(8))
    assert not is_norm_module(nn.Linear(2, 2))
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(config)
    groups = param_groups(model, param_names=True)
    no_decay = {n for g in groups if g["weight_decay"] == 0.0 for n in g["param_names"]}
    assert no_decay == {
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.norm.weight",
    }
    n_unique = len({id(p) for p in model.parameters()})
    assert sum(len(g["params"]) for g in groups) == n_unique  # tied lm_head counted once


# --------------------------------------------------------------------------- transformers


def _training_args(out_dir, **kw):
    from transformers import TrainingArguments

    defaults = dict(
        max_steps=8, per_device_train_batch_size=4, save_strategy="steps", save_steps=4,
        learning_rate=1e-3, weight_decay=0.01, lr_scheduler_type="cosine", warmup_steps=2,
        seed=0, data_seed=0, dataloader_num_workers=0, report_to=[], use_cpu=True,
        disable_tqdm=True, logging_strategy="no",
    )
    defaults.update(kw)
    return TrainingArguments(str(out_dir), **defaults)


def test_kwargs_from_training_args() -> None:
    pytest.importorskip("transformers")
    args = _training_args("unused", adam_beta1=0.8, adam_beta2=0.98, adam_epsilon=1e-6,
                          weight_decay=0.1, learning_rate=3e-4)
    kwargs = came_kwargs_from_training_args(args)
    assert kwargs == {"lr": 3e-4, "betas": (0.8, 0.98, 0.9999), "weight_decay": 0.1}
    assert "eps" not in kwargs  # adam_epsilon does not map onto CAME's (eps1, eps2)
    kwargs = came_kwargs_from_training_args(args, beta3=0.99999, eps=(1e-30, 1e-20), lr=1e-4)
    assert kwargs["betas"] == (0.8, 0.98, 0.99999) and kwargs["lr"] == 1e-4
    assert kwargs["eps"] == (1e-30, 1e-20)
    cls, kwargs = came_optimizer_cls_and_kwargs(args)
    assert cls is CAME and kwargs["lr"] == 3e-4
    with pytest.warns(UserWarning, match="beta3 > beta2"):
        came_kwargs_from_training_args(args, beta3=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        came_kwargs_from_training_args(args)


class _TokenData(torch.utils.data.Dataset):
    def __init__(self, n: int = 24, length: int = 16, vocab: int = 64) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0)  # dropout stays at its 0.1 default
    return GPT2LMHeadModel(config)


@pytest.fixture
def fresh_accelerate_state():
    """Trainer and Accelerator share process-wide singletons; reset them around each test."""
    accelerate_state = pytest.importorskip("accelerate.state")

    def reset():
        accelerate_state.AcceleratorState._reset_state(reset_partial_state=True)
        accelerate_state.GradientState._reset_state()

    reset()
    yield
    reset()


def _trainer(out_dir, how: str):
    from transformers import Trainer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    args = _training_args(out_dir)
    model = _tiny_gpt2()
    if how == "cls_and_kwargs":
        return Trainer(model=model, args=args, train_dataset=_TokenData(),
                       optimizer_cls_and_kwargs=came_optimizer_cls_and_kwargs(args))
    optimizer = came_from_training_args(model, args)
    return Trainer(model=model, args=args, train_dataset=_TokenData(),
                   optimizers=(optimizer, None))


@pytest.mark.parametrize("how", ["cls_and_kwargs", "from_training_args"])
def test_trainer_resume_is_exact(tmp_path, how: str, fresh_accelerate_state) -> None:
    """8 steps straight == 4 steps, checkpoint, resume for 4 (mid-epoch, across an epoch
    boundary, with dropout): the parameters are bitwise equal."""
    pytest.importorskip("transformers")
    full = _trainer(tmp_path / "full", how)
    full.train()
    opt = getattr(full.optimizer, "optimizer", full.optimizer)
    assert isinstance(opt, CAME)
    assert opt.param_groups[0]["betas"] == (0.9, 0.999, 0.9999)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.01, 0.0}
    assert all(float(s["step"]) == 8 for s in opt.state.values())
    final = {k: v.detach().clone() for k, v in full.model.state_dict().items()}

    checkpoint = tmp_path / "full" / "checkpoint-4"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert any("exp_avg_res_row" in s for s in saved["state"].values())  # CAME's state

    resumed = _trainer(tmp_path / "resumed", how)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for name, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, final[name], rtol=0, atol=0, msg=name)

    if how != "cls_and_kwargs":
        return
    # without CAME's state the resumed run would differ: the check above is not vacuous
    (checkpoint / "optimizer.pt").unlink()
    fresh_state = _trainer(tmp_path / "no_state", how)
    fresh_state.train(resume_from_checkpoint=str(checkpoint))
    diff = max((v - final[k]).abs().max().item() for k, v in fresh_state.model.state_dict().items())
    assert diff > 1e-4


# ----------------------------------------------------------------------------- accelerate


def _bf16_ok() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = torch.nn.functional.linear(torch.randn(2, 2), torch.randn(2, 2))
        return y.dtype == torch.bfloat16
    except Exception:
        return False


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 4))


ACCUM, BATCH, N = 3, 4, 48  # 12 micro-batches -> 4 optimizer steps


def _data():
    gen = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randn(N, 16, generator=gen),
                                          torch.randn(N, 4, generator=gen))


def _schedule(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))


def _accelerate_run(mixed_precision: str) -> list[torch.Tensor]:
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=ACCUM,
                              mixed_precision=mixed_precision, cpu=True)
    model = _mlp()
    opt = CAME(param_groups(model, weight_decay=1e-2), lr=1e-2)
    loader = torch.utils.data.DataLoader(_data(), batch_size=BATCH, shuffle=False)
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, _schedule(opt))
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
    inner = opt.optimizer
    assert isinstance(inner, CAME)
    assert all(float(s["step"]) == N // BATCH // ACCUM for s in inner.state.values())
    return [p.detach().clone() for p in accelerator.unwrap_model(model).parameters()]


def _plain_run(mixed_precision: str) -> list[torch.Tensor]:
    model = _mlp()
    opt = CAME(param_groups(model, weight_decay=1e-2), lr=1e-2)
    sched = _schedule(opt)
    loader = torch.utils.data.DataLoader(_data(), batch_size=BATCH, shuffle=False)
    for i, (x, y) in enumerate(loader):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed_precision == "bf16"):
            loss = nn.functional.mse_loss(model(x), y)
        (loss / ACCUM).backward()
        if (i + 1) % ACCUM == 0:
            opt.step()
            sched.step()
            opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "mixed_precision",
    ["no", pytest.param("bf16", marks=pytest.mark.skipif(not _bf16_ok(),
                                                         reason="no CPU bf16 autocast"))],
)
def test_accelerate_prepare_matches_plain_loop(mixed_precision: str,
                                               fresh_accelerate_state) -> None:
    """accelerator.prepare(model, CAME, loader, scheduler) with gradient accumulation (and
    bf16 autocast) == the same loop by hand: bitwise equal parameters."""
    pytest.importorskip("accelerate")
    got = _accelerate_run(mixed_precision)
    want = _plain_run(mixed_precision)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    if mixed_precision == "bf16":  # autocast really was on: fp32 training ends elsewhere
        fp32 = _plain_run("no")
        assert max((a - b).abs().max().item() for a, b in zip(got, fp32)) > 0


def test_accelerate_save_state_resumes_exactly(tmp_path, fresh_accelerate_state) -> None:
    """accelerator.save_state / load_state carry CAME's state and the scheduler: 2 windows,
    save, a fresh process-like setup loads and runs the last 2 windows == 4 windows straight."""
    pytest.importorskip("accelerate")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    def setup():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        accelerator = Accelerator(gradient_accumulation_steps=ACCUM, cpu=True)
        model = _mlp()
        opt = CAME(param_groups(model, weight_decay=1e-2), lr=1e-2)
        loader = torch.utils.data.DataLoader(_data(), batch_size=BATCH, shuffle=False)
        return accelerator, *accelerator.prepare(model, opt, loader, _schedule(opt))

    def train(accelerator, model, opt, loader, sched, stop=None):
        for i, (x, y) in enumerate(loader):
            with accelerator.accumulate(model):
                accelerator.backward(nn.functional.mse_loss(model(x), y))
                opt.step()
                sched.step()
                opt.zero_grad()
            if stop is not None and i + 1 == stop:
                return

    accelerator, model, opt, loader, sched = setup()
    train(accelerator, model, opt, loader, sched)
    want = [p.detach().clone() for p in accelerator.unwrap_model(model).parameters()]

    accelerator, model, opt, loader, sched = setup()
    half = 2 * ACCUM  # micro-batches of two accumulation windows
    train(accelerator, model, opt, loader, sched, stop=half)
    accelerator.save_state(str(tmp_path / "state"))

    accelerator, model, opt, loader, sched = setup()
    accelerator.load_state(str(tmp_path / "state"))
    assert all(float(s["step"]) == 2 for s in opt.optimizer.state.values())
    rest = accelerator.skip_first_batches(loader, half)
    train(accelerator, model, opt, rest, sched)
    got = list(accelerator.unwrap_model(model).parameters())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
