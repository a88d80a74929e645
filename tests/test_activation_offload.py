"""Checkpointing with offloaded layer inputs (llmft.activation_offload) computes the gradients plain checkpointing
does, keeps dropout's random draws between forward and recompute, and is refused where it cannot run."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from llmft.activation_offload import install_offloaded_checkpointing, offloaded_checkpoint
from tests.conftest import TINY_LORA, argv, finetune


def _model(dropout: float = 0.0):
    config = Qwen2Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_dropout=0.0,
        use_sliding_window=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    if dropout:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))
        for name, p in model.named_parameters():  # non-zero B, so the adapters' gradients depend on dropout's draws
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return model


def _loss_and_grads(model, offload: bool):
    if offload:
        assert install_offloaded_checkpointing(model) == 3
    torch.manual_seed(123)
    ids = torch.randint(0, 256, (2, 17))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["full", "lora-dropout"])
def test_offloaded_checkpointing_gives_plain_checkpointings_gradients(dropout):
    plain_loss, plain = _loss_and_grads(_model(dropout), offload=False)
    loss, grads = _loss_and_grads(_model(dropout), offload=True)
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    assert grads.keys() == plain.keys() and len(grads) > 0
    for name in plain:
        torch.testing.assert_close(grads[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_recompute_under_other_draws_would_be_caught():
    """The control: a recompute that does not restore the random state gives other adapter gradients under dropout,
    so the test above can tell."""
    plain_loss, plain = _loss_and_grads(_model(0.3), offload=False)
    model = _model(0.3)

    def forgetful(function, hidden_states, *args, **kwargs):
        torch.rand(1)  # moves the generator between the forward and the recompute
        return torch.utils.checkpoint.checkpoint(function, hidden_states, *args, use_reentrant=True)

    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            module._gradient_checkpointing_func = forgetful
    torch.manual_seed(123)
    ids = torch.randint(0, 256, (2, 17))
    with torch.random.fork_rng():
        model(input_ids=ids, labels=ids).loss.backward()
    lora = [n for n in plain if "lora_A" in n]
    differs = any(not torch.allclose(dict(model.named_parameters())[n].grad, plain[n], rtol=1e-5) for n in lora)
    assert differs


def test_offloaded_checkpoint_frees_nothing_it_needs_and_keeps_input_gradients():
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    y = offloaded_checkpoint(lambda h: torch.tanh(layer(h)), x * 2)
    y.sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    torch.tanh(layer(x_ref * 2)).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize(
    "extra, message",
    [
        ("--offload_activations True", "add --gradient_checkpointing True"),
        ("--lean_recompute True", "--lean_recompute True changes the checkpointed recompute"),
        (
            "--lean_recompute True --gradient_checkpointing True --lora_dropout 0.05",
            "--lean_recompute True recomputes the MLP in chunks.*--lora_dropout 0",
        ),
        (
            "--offload_activations True --gradient_checkpointing True --deepspeed ds_configs/zero2.json",
            "one process without DeepSpeed or FSDP",
        ),
    ],
)
def test_contradictory_offload_flags_are_named(tiny_chat_model, tmp_path, extra, message):
    from llmft.config import parse_args
    from llmft.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        parse_args(argv(TINY_LORA, extra, model=tiny_chat_model, out=tmp_path / "out"))


@pytest.mark.slow
def test_a_run_with_offloaded_activations_trains_the_adapter_a_plain_checkpointed_run_does(tiny_chat_model, tmp_path):
    from safetensors.torch import load_file

    from llmft.activation_offload import offloaded_checkpoint

    run = TINY_LORA + " --max_steps 3 --learning_rate 5e-3 --gradient_checkpointing True --save_strategy no"
    plain = finetune(*argv(run, "--offload_activations False", model=tiny_chat_model, out=tmp_path / "plain"))
    offloaded = finetune(*argv(run, "--offload_activations True", model=tiny_chat_model, out=tmp_path / "off"))

    def checkpoint_functions(model):  # install_offloaded_checkpointing binds its options with functools.partial
        layers = [m for m in model.modules() if hasattr(m, "self_attn")]
        return {getattr(m._gradient_checkpointing_func, "func", m._gradient_checkpointing_func) for m in layers}

    assert checkpoint_functions(offloaded.model) == {offloaded_checkpoint}
    assert offloaded_checkpoint not in checkpoint_functions(plain.model)
    a = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    b = load_file(tmp_path / "off" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("flag, expected", [(None, False), ("True", True), ("False", False)])
def test_the_plan_offloads_as_asked_and_not_by_default_on_the_cpu(tiny_chat_model, tmp_path, flag, expected):
    from llmft.config import parse_args
    from llmft.plan import describe_plan, resolve_plan

    extra = "--gradient_checkpointing True" + (f" --offload_activations {flag}" if flag else "")
    plan = resolve_plan(*parse_args(argv(TINY_LORA, extra, model=tiny_chat_model, out=tmp_path / "out")))
    assert plan.offload_activations is expected
    assert ("offloaded to host memory" in describe_plan(plan)) is expected
