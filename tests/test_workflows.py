"""The workflows around a trained model: the sample command's --top_p, --stop, --prompt_file and
streamed printing; `lstm_jax.load` from Python (generate, score, README's example); export to
safetensors and back without Orbax; bad input through the real commands."""

import functools
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from references import cross_entropy_sum
from subprocesses import ROOT, command_env, run
from subprocesses import run_module as _run

import lstm_jax
from lstm_jax import export
from lstm_jax.checkpoint import Checkpoints, abstract_like
from lstm_jax.config import Config
from lstm_jax.data import Vocab
from lstm_jax.errors import UserError
from lstm_jax.generate import sample_text
from lstm_jax.models import init_params
from lstm_jax.sample import print_as_generated
from lstm_jax.train import train_and_evaluate

README = ROOT / "docs" / "workflows.md"
STEPS = 30


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, small_text) -> Path:
    """A tiny model trained for a few steps on the small text, checkpointed at its last step."""
    root = tmp_path_factory.mktemp("workflows")
    (root / "small.txt").write_text(small_text)
    config = Config.create(
        data_path=str(root / "small.txt"), workdir=str(root / "run"), embed_dim=8, hidden=16,
        num_layers=2, seq_len=16, global_batch=8, num_steps=STEPS, warmup_steps=2,
        learning_rate=1e-2, log_every=1000, eval_every=1000, checkpoint_every=1000, length=10,
        dropout=0.0,
    )  # fmt: skip
    train_and_evaluate(config, devices=jax.local_devices()[:1])
    return root / "run"


def _params_from_checkpoint(workdir: Path, model) -> dict:
    """The checkpoint's parameters, restored here as the sampler did before `lstm_jax.api`."""
    abstract = jax.eval_shape(functools.partial(init_params, model), jax.random.key(0))
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return Checkpoints(workdir, read_only=True).restore_params(
        STEPS, abstract_like(abstract, sharding)
    )


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("error", "FATAL"))]


# --- lstm_jax.load --------------------------------------------------------------------------------


def test_load_gives_the_checkpoints_model_vocabulary_and_step(workdir, small_text):
    model = lstm_jax.load(workdir)
    assert model.step == STEPS and model.config.hidden == 16 and model.config.num_layers == 2
    assert model.vocab.chars == Vocab.from_text(small_text).chars
    assert f"step {STEPS}" in repr(model)
    # Greedy generation from the parameters Orbax holds, one model.apply per character.
    params = _params_from_checkpoint(workdir, model.model)
    ids = model.vocab.encode("The night")
    carry, logits = model.model.apply(
        {"params": params}, model.model.initialize_carry(1), jnp.asarray(ids[None])
    )
    out = []
    for _ in range(40):
        token = jnp.argmax(logits[:, -1], -1)
        out.append(int(token[0]))
        carry, logits = model.model.apply({"params": params}, carry, token[:, None])
    assert model.generate("The night", 40, temperature=0.0) == model.vocab.decode(out)
    # Seeded draws: what the sampler draws for the same settings; another seed, another text.
    drawn = model.generate("The night", 60, temperature=1.0, top_p=0.9, seed=4)
    (expected,) = sample_text(
        model.model, model.params, model.vocab, "The night", length=60, temperature=1.0,
        top_p=0.9, seed=4,
    )  # fmt: skip
    assert drawn == expected != model.generate("The night", 60, temperature=1.0, seed=5)
    # stop: generated in chunks, cut after the first occurrence.
    stop = drawn[10:12]
    assert (
        model.generate("The night", 60, temperature=1.0, top_p=0.9, seed=4, stop=stop)
        == (drawn[: drawn.index(stop) + 2])
    )


def test_score_is_the_bits_per_character_of_one_direct_pass(workdir, small_text):
    model = lstm_jax.load(workdir, checkpoint="latest")
    text = small_text[:1000]  # Four chunks of 256, the last one padded: carry and weights count.
    ids = model.vocab.encode(text)
    params = _params_from_checkpoint(workdir, model.model)
    _, logits = model.model.apply(
        {"params": params}, model.model.initialize_carry(1), jnp.asarray(ids[None])
    )
    want = cross_entropy_sum(logits[0, :-1], ids[1:]) / (len(ids) - 1) / math.log(2)
    np.testing.assert_allclose(model.score(text), want, rtol=1e-5)
    with pytest.raises(UserError, match=r"'X', 'é'.*unknown=\"skip\""):
        model.score("The Xnight éwas X")
    assert model.score("The Xnight éwas X", unknown="skip") == model.score("The night was ")
    with pytest.raises(UserError, match="2 characters"):
        model.score("T")


def _a_file(folder: Path) -> Path:
    (folder / "a_file").write_text("not a folder")
    return folder / "a_file"


# Each call with one bad argument, the ValueError's class and the words its message must hold:
# the argument as Python spells it (`length`, `checkpoint='12345'`), never a `--flag`.
API_REFUSALS = [
    ("generate length=0", lambda m, w, t: m.generate("The", length=0), "length must be > 0"),
    ("generate temperature=-1", lambda m, w, t: m.generate("The", temperature=-1.0),
     "temperature must be >= 0"),
    ("generate top_k beyond vocabulary", lambda m, w, t: m.generate("The", top_k=1000),
     "top_k must be 0 (off) or in [1,"),
    ("generate top_p=0", lambda m, w, t: m.generate("The", top_p=0.0), "top_p must be in (0, 1]"),
    ("generate seed=-1", lambda m, w, t: m.generate("The", seed=-1), "seed must be in [0,"),
    ("generate unknown='bogus'", lambda m, w, t: m.generate("The", unknown="bogus"),
     "unknown must be one of error, skip, got 'bogus'"),
    ("generate unseen prompt", lambda m, w, t: m.generate("Zoë"), "unknown='skip'"),
    ("score unknown='x'", lambda m, w, t: m.score("The night", unknown="x"),
     "unknown must be one of error, skip"),
    ("score one character", lambda m, w, t: m.score("T"), "2 characters"),
    ("load checkpoint='12345'", lambda m, w, t: lstm_jax.load(w, checkpoint="12345"),
     "checkpoint='12345' is not in"),
    ("load member=3 of a single run", lambda m, w, t: lstm_jax.load(w, member=3),
     "not a population"),
    ("load an empty folder", lambda m, w, t: lstm_jax.load(t), "No checkpoint"),
    ("export_model out=''", lambda m, w, t: export.export_model(w, ""), "out is required"),
    ("export_model into a file", lambda m, w, t: export.export_model(w, _a_file(t)),
     "is a file, not a folder"),
    ("export_model into a non-empty folder", lambda m, w, t: export.export_model(w, w),
     "pass overwrite=True"),
    ("export_model checkpoint=999", lambda m, w, t: export.export_model(w, t / "o", checkpoint=999),
     "checkpoint='999' is not in"),
]  # fmt: skip


@pytest.mark.parametrize("call, phrase", [row[1:] for row in API_REFUSALS],
                         ids=[row[0] for row in API_REFUSALS])  # fmt: skip
def test_the_python_api_raises_value_errors_in_pythons_words(workdir, tmp_path, call, phrase):
    model = lstm_jax.load(workdir)
    with pytest.raises(ValueError) as raised:
        call(model, workdir, tmp_path)
    message = str(raised.value)
    assert isinstance(raised.value, UserError), type(raised.value)
    # No flag, only the training command an empty folder needs, which is a command's advice.
    advice = message.replace("python -m lstm_jax.main --workdir=...", "")
    assert phrase in message and "--" not in advice, message
    assert not (tmp_path / "o").exists()
    assert Checkpoints(workdir, read_only=True).steps() == [STEPS]


def test_export_model_from_python_writes_what_the_command_writes(workdir, tmp_path):
    wrote = export.export_model(workdir, tmp_path / "python")
    count = sum(int(np.size(x)) for x in jax.tree.leaves(lstm_jax.load(workdir).params))
    assert wrote == (tmp_path / "python", STEPS, count)
    result = _run("lstm_jax.export", f"--workdir={workdir}", f"--out={tmp_path / 'command'}")
    assert result.returncode == 0, result.stderr[-2000:]
    python, command = tmp_path / "python", tmp_path / "command"
    for name in ("config.json", "vocab.json"):
        assert (python / name).read_bytes() == (command / name).read_bytes(), name
    from safetensors import safe_open  # Its header's order varies from file to file.

    def tensors(folder: Path) -> tuple[dict, dict]:
        with safe_open(folder / "model.safetensors", "numpy") as f:
            return {k: f.get_tensor(k).tolist() for k in f.keys()}, f.metadata()  # noqa: SIM118

    assert tensors(python) == tensors(command)
    assert f"{wrote.parameters:,} parameters" in result.stderr


def test_readme_from_python_example_runs(workdir, capsys):
    section = README.read_text().split("## From Python", 1)[1]
    source = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    assert '"runs/default"' in source
    source = source.replace('"runs/default"', repr(str(workdir)))
    namespace = {}
    exec(compile(source, "README.md: From Python", "exec"), namespace)
    model, printed = namespace["model"], capsys.readouterr().out
    assert printed.startswith(f"{model!r}\nThe night{namespace['text']}\n")
    assert namespace["text"].endswith(".") or len(namespace["text"]) == 300
    assert re.search(r"\n\d+\.\d{3} bits per character\n", printed)
    assert printed.endswith(f"\n{model.vocab.size} characters, hidden 16, step {STEPS}\n")


# --- The sample command ---------------------------------------------------------------------------


def test_sample_command_streams_the_unstreamed_text_with_top_p_stop_and_a_prompt_file(
    workdir, tmp_path
):
    model = lstm_jax.load(workdir)
    prompt = "The night\nwas "  # From a file, its newline included.
    (tmp_path / "prompt.txt").write_text(prompt)
    options = dict(length=2400, temperature=1.0, top_k=12, top_p=0.9, num_samples=2, seed=5)
    texts = sample_text(model.model, model.params, model.vocab, prompt, **options)
    # A stop that first occurs after the first chunk (2400 characters: 3 chunks of 800).
    first = texts[0]
    stop = next(
        first[i : i + 2] for i in range(850, 2390) if first[i : i + 2] not in first[: i + 1]
    )
    args = [f"--workdir={workdir}", f"--prompt_file={tmp_path / 'prompt.txt'}", f"--stop={stop}"]
    args += [f"--{name}={value}" for name, value in options.items()]
    result = _run("lstm_jax.sample", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    cut = [t[: t.index(stop) + len(stop)] if stop in t else t for t in texts]
    assert len(cut[0]) < len(texts[0])
    assert (
        result.stdout == f"--- sample 1 ---\n{prompt}{cut[0]}\n--- sample 2 ---\n{prompt}{cut[1]}\n"
    )


def test_sample_prints_each_piece_as_it_arrives():
    out = io.StringIO()
    flushed = []
    out.flush = lambda: flushed.append(out.getvalue())
    seen = []

    def pieces():  # What was on stdout, flushed, each time the generator is asked for more.
        for piece in (["ab", "x"], ["cd", "y"], ["e", ""]):
            yield piece
            seen.append(flushed[-1])

    real_stdout, sys.stdout = sys.stdout, out
    try:
        print_as_generated(pieces(), "P", 2)
    finally:
        sys.stdout = real_stdout
    head = "--- sample 1 ---\nP"
    assert seen == [head + "ab", head + "abcd", head + "abcde"]
    assert out.getvalue() == head + "abcde\n--- sample 2 ---\nPxy\n"


BAD_SAMPLING = [
    # (name, args ({tmp}: a folder of files), exit code, a phrase the one error line must hold)
    ("top_p 0", ["--top_p=0"], 2, "--top_p must be in (0, 1]"),
    ("top_p above 1", ["--top_p=1.5"], 2, "--top_p must be in (0, 1]"),
    ("top_p nan", ["--top_p=nan"], 2, "--top_p must be a finite number in (0, 1], got nan."),
    ("top_p not a number", ["--top_p=most"], 1, "--top_p=most"),
    ("empty stop", ["--stop="], 2, "--stop must not be empty"),
    ("missing prompt file", ["--prompt_file={tmp}/nope.txt"], 1, "does not exist"),
    ("prompt file a folder", ["--prompt_file={tmp}"], 1, "is a directory"),
    ("prompt file not utf-8", ["--prompt_file={tmp}/latin1.txt"], 1, "is not UTF-8"),
    ("prompt and file", ["--prompt=The", "--prompt_file={tmp}/ok.txt"], 2, "pass only one"),
]


@pytest.mark.parametrize("name, args, code, phrase", BAD_SAMPLING, ids=[b[0] for b in BAD_SAMPLING])
def test_bad_sampling_flags_give_one_line_and_write_nothing(
    workdir, tmp_path, name, args, code, phrase
):
    (tmp_path / "latin1.txt").write_bytes("Café".encode("latin-1"))
    (tmp_path / "ok.txt").write_text("The")
    before = _files(workdir) | _files(tmp_path)
    result = _run(
        "lstm_jax.sample", f"--workdir={workdir}", *[a.format(tmp=tmp_path) for a in args]
    )
    assert result.returncode == code, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = _error_lines(result.stderr)
    assert len(lines) == 1 and phrase in lines[0], result.stderr[-2000:]
    assert _files(workdir) | _files(tmp_path) == before


# --- Export ---------------------------------------------------------------------------------------

LOAD_EXPORT = """
import json, sys
sys.modules["orbax"] = None  # Any import of Orbax fails.
import numpy as np
from safetensors.numpy import load_file
import jax, jax.numpy as jnp
from lstm_jax.models import model_from_settings
out, ids = sys.argv[1], json.loads(sys.argv[2])
config = json.load(open(out + "/config.json"))
vocab = json.load(open(out + "/vocab.json"))
params = {}
for name, array in load_file(out + "/model.safetensors").items():
    *parents, leaf = name.split("/")
    node = params
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = array
model = model_from_settings(config, config["vocab_size"])
assert config["vocab_size"] == len(vocab)
_, logits = model.apply({"params": params}, model.initialize_carry(1), jnp.asarray([ids]))
np.save(out + "/../logits.npy", np.asarray(logits))
"""


def test_export_round_trips_to_the_checkpoints_logits_without_orbax(workdir, tmp_path):
    out = tmp_path / "exported"
    result = _run("lstm_jax.export", f"--workdir={workdir}", f"--out={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(export.FILES)
    model = lstm_jax.load(workdir)
    assert json.loads((out / "vocab.json").read_text()) == model.vocab.chars
    ids = model.vocab.encode("The night was dark. The count")
    loaded = subprocess.run(
        [sys.executable, "-c", LOAD_EXPORT, str(out), json.dumps(ids.tolist())],
        cwd=ROOT, env=command_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    params = _params_from_checkpoint(workdir, model.model)
    _, want = model.model.apply(
        {"params": params}, model.model.initialize_carry(1), jnp.asarray(ids[None])
    )
    np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), want)
    # Again into the same folder: refused in one line, the files untouched; --overwrite writes.
    before = _files(out)
    again = _run("lstm_jax.export", f"--workdir={workdir}", f"--out={out}")
    assert again.returncode == 1 and "Traceback" not in again.stderr
    lines = _error_lines(again.stderr)
    assert len(lines) == 1 and "--overwrite" in lines[0], again.stderr[-2000:]
    assert _files(out) == before
    forced = _run("lstm_jax.export", f"--workdir={workdir}", f"--out={out}", "--overwrite")
    assert forced.returncode == 0, forced.stderr[-2000:]


def test_export_refusals_write_nothing(workdir, tmp_path):
    blocker = tmp_path / "no_safetensors" / "safetensors"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('not installed')\n")
    cases = [
        ([f"--workdir={tmp_path}/nothing"], {}, 1, "No checkpoint"),
        ([f"--workdir={workdir}", "--checkpoint=999"], {}, 1, "--checkpoint=999"),
        ([f"--workdir={workdir}", "--out="], {}, 2, "--out is required"),
        ([f"--workdir={workdir}"], {"PYTHONPATH": str(blocker.parent)}, 1, "pip install"),
    ]
    for args, env, code, phrase in cases:
        if not any(a.startswith("--out") for a in args):
            args = [*args, f"--out={tmp_path}/out"]
        if env:  # The blocker first on the path, then what the tests run with.
            env["PYTHONPATH"] = os.pathsep.join(
                [env["PYTHONPATH"], os.environ.get("PYTHONPATH", "")]
            )
        result = run(
            [sys.executable, "-m", "lstm_jax.export", *args],
            cwd=ROOT, env=command_env() | env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == code, (args, result.stderr[-2000:])
        lines = _error_lines(result.stderr)
        assert len(lines) == 1 and phrase in lines[0], (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "out").exists() and not (tmp_path / "nothing").exists()
    assert Checkpoints(workdir, read_only=True).steps() == [STEPS]
