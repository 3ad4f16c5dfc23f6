"""Causal language models: supervision masks, the gathered chunked loss, packing, truncation, template
checks, generation, perplexity (also under DDP), export + pipeline, resume, `finetune chat`, bad input."""
import json
import os
import signal
import types

import lightning as L
import pytest

import torch
import torch.nn.functional as F

from datamodules import ChatDataModule
from datamodules.chat import TemplateError, pack_rows, render_conversation
from datamodules.loading import DataError
from lightning_modules import TaskModule
from lightning_modules.tasks import CausalLM
from lightning_modules.tasks.causal_lm import chunked_token_losses
from tests.helpers import PRODUCTS, tiny_llama_config, toy_conversations, write_jsonl
from tests.test_resume_ddp import _callbacks, _read
from tests.utils import ROOT, make_trainer, run_cli, write_config

CONVERSATION = [{"role": "system", "content": "You are a shop assistant ."},
                {"role": "user", "content": "how much is the tea ?"},
                {"role": "assistant", "content": "the tea costs four dollars ."},
                {"role": "user", "content": "how much is the milk ?"},
                {"role": "assistant", "content": "the milk costs one dollars ."}]


@pytest.fixture(scope="module")
def chat(task_data):
    return task_data.chat


def make_dm(chat, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("max_length", 96)
    return ChatDataModule(tokenizer=chat["tokenizer"], data_files=kw.pop("files", chat["files"]), **kw)


def make_module(chat, dm, task=None, config=None, seed=0, **kw):
    L.seed_everything(seed)
    module = TaskModule(task or CausalLM(num_generations=4, max_new_tokens=12), backbone=chat["tokenizer"],
                        backbone_config=config or tiny_llama_config(), lr=kw.pop("lr", 1e-2), **kw)
    module.build(dm.data_info)
    return module


def supervised_text(dm, row):
    tok = dm.tokenizer
    return [tok.decode([i]) for i, label in zip(row["input_ids"], row["labels"]) if label != -100]


# ---------------------------------------------------------------- labels and templates
@pytest.mark.parametrize("supervise", ["assistant", "last", "all"])
def test_labels_are_minus_100_outside_the_supervised_tokens(chat, tmp_path, supervise):
    files = {"train": write_jsonl(str(tmp_path / "t.jsonl"), [{"messages": CONVERSATION}] * 4),
             "validation": write_jsonl(str(tmp_path / "v.jsonl"), [{"messages": CONVERSATION}])}
    dm = make_dm(chat, files=files, supervise=supervise)
    dm.setup("fit")
    row = dm.encoded("train")[0]
    tok = dm.tokenizer
    text = "".join(supervised_text(dm, row))
    first, last = "the tea costs four dollars .<|im_end|>\n", "the milk costs one dollars .<|im_end|>\n"
    if supervise == "assistant":
        assert text == first + last
    elif supervise == "last":
        assert text == last
    else:  # every token but the first, which nothing predicts
        assert text == tok.decode(row["input_ids"][1:])
    assert row["labels"][0] == -100


def test_training_and_generation_prompts_render_to_the_same_ids(chat):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat["tokenizer"])
    rendered = render_conversation(tok, CONVERSATION, None)
    for k, (start, end) in zip(rendered["turns"], rendered["spans"]):
        prompt = tok.apply_chat_template(CONVERSATION[:k], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        assert rendered["ids"][:start] == prompt  # what inference is prompted with is what training saw
        assert tok.decode(rendered["ids"][start:end]) == CONVERSATION[k]["content"] + "<|im_end|>\n"


def test_a_template_that_cannot_mark_assistant_tokens_is_refused(chat, tmp_path):
    # the generation prompt says "assistant:" but turns are rendered as "bot:": no prefix relation
    skewed = ("{% for m in messages %}{{ ('bot' if m['role'] == 'assistant' else m['role']) + ': ' + m['content'] + '\\n' }}"
              "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    dm = make_dm(chat, chat_template=skewed)
    with pytest.raises(TemplateError, match=r"line 1 of .*cannot mark the assistant.s tokens"):
        dm.setup("fit")


# ---------------------------------------------------------------- the loss
def test_gathered_chunked_loss_equals_the_full_logits_loss_float64(chat):
    dm = make_dm(chat)
    dm.setup("fit")
    for smoothing in (0.0, 0.1):
        module = make_module(chat, dm, task=CausalLM(label_smoothing=smoothing, loss_chunk_size=7))
        model = module.model.double()
        rows = sorted(dm.encoded("train"), key=lambda r: r["length"])
        batch = dm.collator()([rows[0], rows[len(rows) // 2], rows[-1], rows[1]])
        assert (batch["attention_mask"] == 0).any()  # padding is part of the test
        out = module.task.forward(model, batch)
        chunked = module.task.loss(out, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        full = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100,
                               label_smoothing=smoothing)
        assert chunked.dtype == torch.float64 or chunked.dtype == torch.float32
        assert abs(chunked.item() - full.item()) < 1e-6
        grads = torch.autograd.grad(chunked, [p for p in model.parameters() if p.requires_grad])
        reference = torch.autograd.grad(full, [p for p in model.parameters() if p.requires_grad])
        assert max((a - b).abs().max().item() for a, b in zip(grads, reference)) < 1e-6


def test_the_chunked_loss_never_builds_more_than_one_chunk_of_logits():
    seen = []

    def head(h):
        seen.append(h.shape[0])
        return h @ torch.ones(4, 1000, dtype=h.dtype)

    hidden = torch.randn(50, 4, requires_grad=True)
    losses = chunked_token_losses(hidden, torch.randint(0, 1000, (50,)), head, vocab=1000, chunk_size=8)
    losses.sum().backward()
    assert max(seen) == 8 and len(losses) == 50  # forward and the recomputation in backward: chunks only


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_packed_rows_give_the_same_loss_as_unpacked_rows(chat, model_type):
    dm = make_dm(chat)
    dm.setup("fit")
    config = tiny_llama_config() if model_type == "llama" else dict(
        model_type="gemma3_text", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, sliding_window=4, query_pre_attn_scalar=8,
        layer_types=["sliding_attention", "full_attention"])
    module = make_module(chat, dm, config=config)
    model = module.model.double()
    rows = [dm.encoded("train")[i] for i in range(6)]
    single = dm.collator()(rows)
    out = module.task.forward(model, single)
    unpacked, _ = module.task.token_losses(out, single)
    from datasets import Dataset

    packed_ds = pack_rows(Dataset.from_list([{k: r[k] for k in ("input_ids", "labels", "index", "length")} for r in rows]),
                          max_length=400, seed=0)
    assert len(packed_ds) < len(rows)  # conversations really share rows
    packed = dm.collator()([packed_ds[i] for i in range(len(packed_ds))])
    assert "attention_mask" not in packed and "position_ids" in packed
    losses, _ = module.task.token_losses(module.task.forward(model, packed), packed)
    assert len(losses) == len(unpacked)
    assert abs(losses.sum().item() - unpacked.sum().item()) < 1e-8


def test_training_packs_rows_and_still_learns(chat):
    dm = make_dm(chat, packing=True, max_length=128)
    dm.setup("fit")
    assert len(dm.encoded("train")) < 64 and "position_ids" in dm.encoded("train").column_names
    module = make_module(chat, dm)
    trainer = make_trainer("/tmp", max_epochs=10, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    assert float(trainer.callback_metrics["val/perplexity"]) < 4.0  # from about 400 (the vocabulary) untrained


# ---------------------------------------------------------------- truncation
def test_truncation_drops_the_oldest_turns_never_the_supervised_one_and_counts(chat, tmp_path):
    long = []
    for item in ["tea", "milk", "rice", "apple", "bread", "cheese"] * 2:
        long += [{"role": "user", "content": f"how much is the {item} ?"},
                 {"role": "assistant", "content": f"the {item} costs {PRODUCTS[item]} dollars ."}]
    rows = [{"messages": long}, {"messages": CONVERSATION[1:3]}]
    files = {"train": write_jsonl(str(tmp_path / "t.jsonl"), rows), "validation": write_jsonl(str(tmp_path / "v.jsonl"), rows)}
    dm = make_dm(chat, files=files, max_length=64, supervise="last")
    dm.setup("fit")
    row = dm.encoded("train")[0]
    assert len(row["input_ids"]) <= 64
    assert "".join(supervised_text(dm, row)) == "the cheese costs five dollars .<|im_end|>\n"  # the last turn, whole
    text = dm.tokenizer.decode(row["input_ids"])
    assert text.startswith("<|im_start|>user\n")  # cut at a turn boundary
    counts = dm.truncated["train"]
    assert counts["shortened"] == 1 and counts["dropped_turns"] == 24 - len(text.split("<|im_start|>")[1:])
    assert counts["too_long"] == 0


def test_a_conversation_whose_last_exchange_is_too_long_is_dropped_and_counted(chat, tmp_path):
    huge = [{"role": "user", "content": "how much is the tea ? " * 40}, {"role": "assistant", "content": "four ."}]
    rows = [{"messages": huge}] + toy_conversations(5, seed=3)
    files = {"train": write_jsonl(str(tmp_path / "t.jsonl"), rows), "validation": write_jsonl(str(tmp_path / "v.jsonl"), rows)}
    dm = make_dm(chat, files=files, max_length=64)
    dm.setup("fit")
    assert dm.truncated["train"]["too_long"] == 1 and len(dm.encoded("train")) == 5


# ---------------------------------------------------------------- learning, generation, perplexity
@pytest.fixture(scope="module")
def overfit(chat, tmp_path_factory):
    """A tiny model trained until it knows the prices."""
    dm = make_dm(chat, batch_size=8)
    dm.setup("fit")
    module = make_module(chat, dm, config=tiny_llama_config(hidden_size=64, intermediate_size=128), lr=3e-3,
                         task=CausalLM(num_generations=9, max_new_tokens=12))
    trainer = make_trainer(tmp_path_factory.mktemp("overfit"), max_epochs=40, num_sanity_val_steps=0,
                           check_val_every_n_epoch=40)
    trainer.fit(module, datamodule=dm)
    return module, dm, trainer


def test_a_tiny_model_overfits_and_greedy_generation_reproduces_the_replies(overfit):
    module, dm, trainer = overfit
    assert float(trainer.callback_metrics["val/perplexity"]) < 1.3
    samples = module.task.eval_samples()
    assert samples and all(s["hypothesis"] == s["reference"] for s in samples), samples
    assert float(trainer.callback_metrics["val/bleu"]) > 90


def test_perplexity_is_exp_of_the_token_weighted_nll(overfit):
    module, dm, _ = overfit
    trainer = make_trainer("/tmp")
    metrics = trainer.validate(module, datamodule=dm, verbose=False)[0]
    total, tokens = 0.0, 0
    module.model.eval()
    with torch.no_grad():
        for i in range(len(dm.encoded("validation"))):  # one conversation at a time: no batching effects
            batch = dm.collator()([dm.encoded("validation")[i]])
            losses, _ = module.task.token_losses(module.task.forward(module.model, batch), batch, label_smoothing=0.0)
            total, tokens = total + losses.double().sum().item(), tokens + len(losses)
    assert metrics["val/nll"] == pytest.approx(total / tokens, rel=1e-5)
    assert metrics["val/perplexity"] == pytest.approx(torch.tensor(total / tokens).exp().item(), rel=1e-5)


# ---------------------------------------------------------------- through the CLI
def chat_config(tmp_path, chat, name="chat.yaml", **overrides):
    cfg = {"seed_everything": 0,
           "model": {"backbone": chat["tokenizer"], "backbone_config": tiny_llama_config(hidden_size=64, intermediate_size=128),
                     "task": {"class_path": "lightning_modules.tasks.CausalLM",
                              "init_args": {"num_generations": 9, "max_new_tokens": 12}}, "lr": 3e-3},
           "data": {"class_path": "datamodules.ChatDataModule",
                    "init_args": {"data_files": dict(chat["files"]), "batch_size": 8, "max_length": 96,
                                  "system_prompt": "You are a shop assistant ."}},
           "trainer": {"accelerator": "cpu", "max_epochs": 40, "check_val_every_n_epoch": 20, "enable_progress_bar": False,
                       "enable_model_summary": False, "log_every_n_steps": 4, "logger": False}}
    return write_config(tmp_path, cfg, name, overrides)


@pytest.fixture(scope="module")
def cli_run(chat, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat_cli")
    cfg = chat_config(tmp, chat)
    run_cli(["fit", "-c", cfg, "--run_root", str(tmp / "runs"), "--experiment", "shop"], cwd=tmp)
    return tmp, cfg, tmp / "runs" / "shop" / "version_0"


def test_the_pipeline_loads_the_export_and_answers_like_finetune_predict(cli_run):
    from transformers import pipeline

    tmp, cfg, run = cli_run
    conversations = [{"messages": [{"role": "user", "content": f"how much is the {item} ?"}]} for item in ("tea", "rice", "milk")]
    conversations.append({"messages": [{"role": "user", "content": "how much is the tea ?"},
                                       {"role": "assistant", "content": "the tea costs four dollars ."},
                                       {"role": "user", "content": "how much is the bread ?"}]})
    predict_file = write_jsonl(str(tmp / "predict.jsonl"), conversations)
    run_cli(["predict", "-c", cfg, "--run_root", str(tmp / "runs"), "--experiment", "shop_predict",
             "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--data.predict_file", predict_file,
             "--export.use_best", "false"], cwd=tmp)
    predictions = _read(tmp / "runs" / "shop_predict" / "version_0" / "predictions.jsonl")
    assert [p["index"] for p in predictions] == [0, 1, 2, 3]
    generator = pipeline("text-generation", model=str(run / "export"))
    for conv, pred in zip(conversations, predictions):
        messages = [{"role": "system", "content": "You are a shop assistant ."}] + conv["messages"]
        answer = generator(messages)[0]["generated_text"][-1]
        assert answer["role"] == "assistant" and answer["content"].strip() == pred["prediction"]
    assert predictions[1]["prediction"] == "the rice costs six dollars ."  # and it learned


def test_finetune_chat_answers_piped_input_with_history_and_reset(cli_run):
    tmp, cfg, run = cli_run
    script = "how much is the tea ?\nhow much is the cheese ?\n/reset\nhow much is the milk ?\n/exit\nhow much is the rice ?\n"
    import subprocess
    import sys

    for source in (["--ckpt_path", str(run / "checkpoints" / "last.ckpt")], ["--export", str(run / "export")]):
        proc = subprocess.run([sys.executable, "-m", "finetune_lab.cli", "chat", *source], input=script, text=True,
                              capture_output=True, cwd=tmp, timeout=120,
                              env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))
        assert proc.returncode == 0, proc.stderr[-2000:]
        replies = [line for line in proc.stdout.splitlines() if line.startswith("assistant> ")]
        assert replies == ["assistant> the tea costs four dollars .", "assistant> the cheese costs five dollars .",
                           "assistant> the milk costs one dollars ."]  # nothing after /exit
        assert "(conversation reset)" in proc.stdout


def test_sigkill_then_resume_last_equals_uninterrupted(chat, tmp_path):
    cfg = chat_config(tmp_path, chat, **{"trainer.max_epochs": 2, "trainer.check_val_every_n_epoch": 1,
                                         "checkpoint.every_n_train_steps": 3,
                                         "model.task.init_args.num_generations": 2})
    runs = str(tmp_path / "runs")
    full_log, killed_log, resumed_log = (str(tmp_path / f"{n}.jsonl") for n in ("full", "killed", "resumed"))
    run_cli(["fit", "-c", cfg, "--run_root", runs, "--experiment", "full",
             "--trainer.callbacks+", json.dumps(_callbacks(("RecordBatches", {"path": full_log}))[0])], cwd=tmp_path)
    killed = run_cli(["fit", "-c", cfg, "--run_root", runs, "--experiment", "killed",
                      "--trainer.callbacks+", json.dumps(_callbacks(("RecordBatches", {"path": killed_log}))[0]),
                      "--trainer.callbacks+", json.dumps(_callbacks(("KillAt", {"step": 11}))[0])], cwd=tmp_path, check=False)
    assert killed.returncode == -signal.SIGKILL
    run_cli(["fit", "-c", cfg, "--run_root", runs, "--experiment", "killed", "--ckpt_path", "last",
             "--trainer.callbacks+", json.dumps(_callbacks(("RecordBatches", {"path": resumed_log}))[0])], cwd=tmp_path)
    resumed = _read(resumed_log)
    assert resumed[0][0] == 9  # the last step save before the kill
    assert [b for b in _read(killed_log) if b[0] < 9] + resumed == _read(full_log)
    finals = [json.load(open(os.path.join(runs, exp, f"version_{v}", "final_metrics.json"))) for exp, v in (("full", 0), ("killed", 1))]
    for key in ("val/loss", "val/perplexity", "val/bleu"):
        assert finals[0][key] == finals[1][key], key


def test_ddp_perplexity_equals_single_process_with_an_odd_number_of_conversations(cli_run, chat):
    tmp, cfg, run = cli_run
    assert len(_read(chat["files"]["validation"])) % 2 == 1
    results = {}
    for devices in (1, 2):
        run_cli(["validate", "-c", cfg, "--run_root", str(tmp / "runs"), "--experiment", f"val{devices}",
                 "--trainer.devices", str(devices), "--trainer.strategy", "ddp" if devices > 1 else "auto",
                 "--ckpt_path", str(run / "checkpoints" / "last.ckpt")], cwd=tmp)
        with open(tmp / "runs" / f"val{devices}" / "version_0" / "metrics_validate.json") as f:
            results[devices] = json.load(f)
    for key in ("val/perplexity", "val/nll", "val/loss", "val/bleu", "val/chrf", "val/rougeL"):
        assert results[1][key] == pytest.approx(results[2][key], rel=1e-6), key


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("rows,expected", [
    ([{"text": "hello"}], "messages_column='messages' is not a column"),
    ([{"messages": [{"role": "customer", "content": "hi"}, {"role": "assistant", "content": "hello"}]}],
     r"line 1 of .*unknown role 'customer'.*data.role_map"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], r"line 1 of .*no assistant turn"),
    ([{"messages": "hi"}], "not a list of turns"),
    ([{"messages": [{"speaker": "user", "content": "hi"}]}], "data.role_key"),
])
def test_bad_conversations_are_clear_errors(chat, tmp_path, rows, expected):
    files = {"train": write_jsonl(str(tmp_path / "t.jsonl"), rows), "validation": write_jsonl(str(tmp_path / "v.jsonl"), rows)}
    with pytest.raises(DataError, match=expected):
        make_dm(chat, files=files).setup("fit")


def test_an_empty_file_and_a_tokenizer_without_template_are_clear_errors(chat, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        make_dm(chat, files={"train": str(empty)}).setup("fit")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat["tokenizer"])
    tok.chat_template = None
    tok.save_pretrained(str(tmp_path / "plain"))
    with pytest.raises(TemplateError, match="no chat template.*data.chat_template"):
        ChatDataModule(tokenizer=str(tmp_path / "plain"), data_files=chat["files"]).setup("fit")
    ChatDataModule(tokenizer=str(tmp_path / "plain"), data_files=chat["files"], chat_template="chatml").setup("fit")


def test_field_mapping_turns_sgd_style_dialogues_into_chat(chat, tmp_path):
    rows = [{"services": ["Shop_1", "Shop_2"], "turns": [{"speaker": "USER", "utterance": "how much is the tea ?"},
                                                         {"speaker": "SYSTEM", "utterance": "the tea costs four dollars ."}]}]
    files = {"train": write_jsonl(str(tmp_path / "t.jsonl"), rows * 3), "validation": write_jsonl(str(tmp_path / "v.jsonl"), rows)}
    dm = make_dm(chat, files=files, messages_column="turns", role_key="speaker", content_key="utterance",
                 role_map={"USER": "user", "SYSTEM": "assistant"}, system_prompt="You help with {services} .")
    dm.setup("fit")
    text = dm.tokenizer.decode(dm.encoded("train")[0]["input_ids"])
    assert text.startswith("<|im_start|>system\nYou help with Shop_1, Shop_2 .<|im_end|>\n<|im_start|>user\nhow much")
    assert "".join(supervised_text(dm, dm.encoded("train")[0])) == "the tea costs four dollars .<|im_end|>\n"
    assert dm.data_info.system_prompt == "You help with {services} ."


def test_instruction_columns_and_raw_text(chat, tmp_path):
    rows = [{"instruction": "price of tea", "input": "in dollars", "output": "four"}] * 3
    files = {"train": write_jsonl(str(tmp_path / "i.jsonl"), rows), "validation": write_jsonl(str(tmp_path / "iv.jsonl"), rows)}
    dm = make_dm(chat, files=files, prompt_column="instruction", input_column="input", response_column="output")
    dm.setup("fit")
    assert "price of tea\n\nin dollars" in dm.tokenizer.decode(dm.encoded("train")[0]["input_ids"])
    text_rows = [{"text": "the tea costs four dollars . " * 30}, {"text": ""}, {"text": "hello world"}]
    files = {"train": write_jsonl(str(tmp_path / "r.jsonl"), text_rows), "validation": write_jsonl(str(tmp_path / "rv.jsonl"), text_rows)}
    dm = make_dm(chat, files=files, text_column="text", max_length=32)
    dm.setup("fit")
    lengths = dm.encoded("train")["length"]
    assert max(lengths) <= 32 and len(lengths) > 2 and dm.truncated["train"]["empty"] == 1
    assert all(label != -100 for row in dm.encoded("train") for label in row["labels"][1:])


# ---------------------------------------------------------------- the real offline LLM
@pytest.mark.slow
def test_gemma3_270m_alias_renders_gemma_turns_trains_a_lora_step_and_answers(tmp_path):
    """The offline Gemma 3 270M (converted once from its GGUF into the cache): Gemma's turn format with the
    supervised span checked against the generation prompt, a LoRA step that lowers the loss of its batch,
    and a greedy reply that stops at <end_of_turn>."""
    from finetune_lab.hub import resolve_backbone
    from lightning_modules.regimes import Peft

    folder = resolve_backbone("gemma3-270m")
    assert os.path.isfile(os.path.join(folder, "model.safetensors"))
    rows = [{"messages": [{"role": "system", "content": "You are a shop assistant."},
                          {"role": "user", "content": "How much is the tea?"},
                          {"role": "assistant", "content": "The tea costs four dollars."}]}] * 2
    files = {"train": write_jsonl(str(tmp_path / "t.jsonl"), rows), "validation": write_jsonl(str(tmp_path / "v.jsonl"), rows)}
    dm = ChatDataModule(tokenizer="gemma3-270m", data_files=files, batch_size=2, max_length=64)
    dm.setup("fit")
    row = dm.encoded("train")[0]
    tok = dm.tokenizer
    assert tok.decode(row["input_ids"]).startswith("<bos><start_of_turn>user\nYou are a shop assistant.\n\nHow much is the tea?"
                                                   "<end_of_turn>\n<start_of_turn>model\n")
    assert "".join(supervised_text(dm, row)) == "The tea costs four dollars.<end_of_turn>\n"
    L.seed_everything(0)
    module = TaskModule(CausalLM(num_generations=1, max_new_tokens=8), backbone="gemma3-270m", lr=1e-3,
                        regimes=[Peft("LORA", {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]})])
    module.build(dm.data_info)
    assert module.task.stop_ids == [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]
    batch = dm.collator()([row, row])
    optimizer = torch.optim.AdamW([p for p in module.model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(3):
        loss = module.task.loss(module.task.forward(module.model, batch), batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    out = module.task.evaluate(module.model.eval(), batch)
    assert out.sequences.shape[1] <= 8 and out.generated == [0, 1]


def test_the_fused_head_loss_equals_autograd_with_bias_softcap_and_smoothing():
    from lightning_modules.tasks.causal_lm import fused_linear_cross_entropy_sum

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=True).double()
    hidden = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (13,))
    for smoothing, cap in ((0.0, None), (0.1, 3.0)):
        fused = fused_linear_cross_entropy_sum(hidden, targets, head, vocab=50, chunk_size=4, label_smoothing=smoothing, softcap=cap)
        grads = torch.autograd.grad(fused * 0.7, [hidden, head.weight, head.bias])
        logits = head(hidden)
        logits = torch.tanh(logits / cap) * cap if cap else logits
        plain = F.cross_entropy(logits, targets, reduction="sum", label_smoothing=smoothing)
        reference = torch.autograd.grad(plain * 0.7, [hidden, head.weight, head.bias])
        assert abs(fused.item() - plain.item()) < 1e-10
        assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(grads, reference))


def test_under_bf16_autocast_the_head_casts_once_and_matches_autocast_itself(monkeypatch):
    """The fused loss and the frozen-head function cast the weight once per pass (not per chunk), with the
    same result as letting autocast cast it in every call."""
    from lightning_modules.tasks import causal_lm
    from lightning_modules.tasks.causal_lm import CausalLM, fused_linear_cross_entropy_sum

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False)
    head.weight.requires_grad_(False)  # frozen, as under LoRA: autocast does not cache its cast
    hidden = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 300, (40,))
    casts = []
    real_to = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        if self is head.weight:
            casts.append(args)
        return real_to(self, *args, **kwargs)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = sum(F.cross_entropy(head(hidden[i:i + 8]).float(), targets[i:i + 8], reduction="sum") for i in range(0, 40, 8))
        ref_grad, = torch.autograd.grad(reference, hidden)
        monkeypatch.setattr(torch.Tensor, "to", counting_to)
        fused = fused_linear_cross_entropy_sum(hidden, targets, head, vocab=300, chunk_size=8)
        monkeypatch.undo()
        assert len(casts) == 1  # five chunks, one cast
        grad, = torch.autograd.grad(fused, hidden)
        model = torch.nn.Module()
        model.config = types.SimpleNamespace()
        model.get_output_embeddings = lambda: head
        frozen = CausalLM.head_of(model)
        chunked = causal_lm.chunked_token_losses(hidden.detach(), targets, frozen, vocab=300, chunk_size=8)
    assert torch.allclose(fused.float(), reference.float(), rtol=1e-3)
    assert torch.allclose(grad, ref_grad, rtol=2e-2, atol=1e-3) and grad.dtype == torch.float32
    assert torch.allclose(chunked.sum(), reference.detach().float(), rtol=1e-3)
    assert frozen(hidden[:3].detach()).dtype == torch.float32  # outside autocast it is the plain head


def test_a_smaller_student_from_backbone_layers_distils_from_a_checkpoint_teacher(chat, overfit, tmp_path):
    from lightning_modules.regimes import Distillation

    teacher_module, dm, _ = overfit
    teacher_ckpt = str(tmp_path / "teacher.ckpt")
    trainer = make_trainer(tmp_path, max_epochs=1)
    trainer.strategy.connect(teacher_module)
    trainer.save_checkpoint(teacher_ckpt)
    folder = str(tmp_path / "teacher_export")
    teacher_module.model.save_pretrained(folder)
    dm.tokenizer.save_pretrained(folder)
    L.seed_everything(0)
    student = TaskModule(CausalLM(num_generations=0), backbone=folder, backbone_layers=[1], lr=3e-3,
                         regimes=[Distillation(teacher=teacher_ckpt, alpha=1.0, temperature=1.0)])
    student.build(dm.data_info)
    assert student.model.config.num_hidden_layers == 1
    trainer = make_trainer(tmp_path, max_epochs=2, num_sanity_val_steps=0)
    trainer.fit(student, datamodule=dm)
    regime = student.regimes[0]
    assert regime.teacher is not None and not regime.teacher.training
    assert float(trainer.callback_metrics["train/loss_soft"]) < 0.5  # the one-layer student follows its teacher


# ---------------------------------------------------------------- frozen base in bf16
def test_frozen_dtype_autocast_stores_the_frozen_base_in_bf16_and_a_checkpoint_loads_on_a_float32_base(chat, tmp_path):
    from lightning_modules.regimes import Freeze, Peft

    dm = make_dm(chat)
    dm.setup("fit")
    lora = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
    losses, modules = {}, {}
    for frozen in ("keep", "autocast"):
        module = make_module(chat, dm, regimes=[Peft("LORA", dict(lora))], frozen_dtype=frozen, lr=3e-3)
        trainer = make_trainer(tmp_path, max_steps=6, precision="bf16-mixed", limit_val_batches=0, num_sanity_val_steps=0)

        class Losses(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                losses.setdefault(frozen, []).append(float(outputs["loss"]))

        trainer.callbacks.append(Losses())
        trainer.fit(module, datamodule=dm)
        modules[frozen] = (module, trainer)
    module, trainer = modules["autocast"]
    model = module.model
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            if p.requires_grad:
                assert p.dtype == torch.float32, name  # LoRA weights train in float32
            elif isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                assert p.dtype == torch.bfloat16, name
            else:
                assert p.dtype == torch.float32, name  # norms stay float32
    base = model.get_base_model()
    assert base.get_input_embeddings().weight is base.get_output_embeddings().weight  # still tied
    assert base.get_input_embeddings()(torch.tensor([[1, 2]])).dtype == torch.float32  # the residual stream stays float32
    assert all(p.dtype == torch.float32 for p in modules["keep"][0].model.parameters())
    # the same learning as plain autocast, up to the embedding table's rounding
    assert abs(losses["autocast"][0] - losses["keep"][0]) < 0.02 * losses["keep"][0]
    assert losses["autocast"][-1] < losses["autocast"][0]
    # a trainable-only checkpoint names the base as built: it loads on a freshly built float32 base
    path = str(tmp_path / "frozen_bf16.ckpt")
    trainer.save_checkpoint(path)
    fresh = make_module(chat, dm, regimes=[Peft("LORA", dict(lora))])
    metrics = make_trainer(tmp_path, precision="bf16-mixed").validate(fresh, datamodule=dm, ckpt_path=path, verbose=False)[0]
    again = make_trainer(tmp_path, precision="bf16-mixed").validate(module, datamodule=dm, verbose=False)[0]
    assert abs(metrics["val/nll"] - again["val/nll"]) < 0.02 * again["val/nll"]
    # the merged export adds the LoRA update in float32 to the base the model trained with
    from callbacks.export import HFExport

    folder = str(tmp_path / "merged")
    HFExport.export_merged(model, None, dm.tokenizer, folder)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(folder)
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    q = base.model.layers[0].self_attn.q_proj
    delta = (q.lora_B["default"].weight @ q.lora_A["default"].weight) * q.scaling["default"]
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, q.base_layer.weight.float() + delta)
    # Gemma's scaled embedding: the stored table is rounded, the sqrt(width) scale is applied in float32
    gemma = dict(model_type="gemma3_text", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, max_position_embeddings=256, sliding_window=64, query_pre_attn_scalar=8,
                 layer_types=["sliding_attention", "full_attention"])
    module = make_module(chat, dm, config=gemma, regimes=[Peft("LORA", dict(lora))], frozen_dtype="autocast")
    make_trainer(tmp_path, max_steps=1, precision="bf16-mixed", limit_val_batches=0, num_sanity_val_steps=0).fit(module, datamodule=dm)
    embed = module.model.get_base_model().get_input_embeddings()
    ids = torch.tensor([[3, 5, 7]])
    assert embed.weight.dtype == torch.bfloat16
    torch.testing.assert_close(embed(ids), embed.weight[ids].float() * embed.embed_scale.float(), atol=0, rtol=0)
    # gradual unfreezing would hand AdamW half-precision weights: refused
    module = make_module(chat, dm, regimes=[Freeze(embeddings=True, layers=1, unfreeze_every_epochs=1)], frozen_dtype="autocast")
    with pytest.raises(ValueError, match="unfreeze"):
        make_trainer(tmp_path, max_steps=1, precision="bf16-mixed").fit(module, datamodule=dm)
