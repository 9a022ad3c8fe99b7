"""Test set-up: 8 fake CPU devices for pmap, and where the real Dracula text comes from.

XLA_FLAGS must be set before JAX starts its backend, so it is set here, at import.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# One persistent compilation cache for the commands that tests start in subprocesses: the same
# tiny models are compiled again and again otherwise (tests/subprocesses.py passes it on). JAX
# writes a cache entry in place, not atomically, so a reader can meet a half-written entry (two
# processes of one job, or one killed mid-write) and crash on it: the test process itself does
# not use the cache, and tests that kill or pair processes start them without it.
# Under pytest-xdist (-n 2) every worker gets a cache of its own, for the same reason.
if os.environ.get("PYTEST_XDIST_WORKER") or "LSTM_JAX_TEST_COMPILE_CACHE" not in os.environ:
    os.environ["LSTM_JAX_TEST_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="lstm_jax_xla_")

import jax  # noqa: E402
import pytest  # noqa: E402

# The test process compiles the same tiny programs again in every train_and_evaluate call (new
# jitted closures each time): a persistent cache of its own halves test_checkpoint.py's time
# (102 s -> 50 s, measured). Its own folder, not the subprocesses' one above: only this process
# writes it, and it is never killed mid-write.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="lstm_jax_xla_inproc_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

DRACULA_ENV = "LSTM_JAX_DRACULA"
GUTENBERG_DRACULA_FALLBACK = Path(__file__).resolve().parents[2] / "shared" / "data" / "dracula.txt"


@pytest.fixture(scope="session")
def dracula_path(tmp_path_factory) -> Path:
    """The Dracula text every run trains on by default, as a plain file for --data_path: the body
    bundled with the package (lstm_jax/books), so no test needs the network or a local copy."""
    from lstm_jax.books import dracula

    path = tmp_path_factory.mktemp("dracula") / "dracula.txt"
    path.write_bytes(dracula().encode("utf-8"))
    return path


@pytest.fixture(scope="session")
def gutenberg_dracula_path() -> Path:
    """The raw Project Gutenberg file, header and licence included: $LSTM_JAX_DRACULA (CI sets
    it), else ../shared/data/dracula.txt beside the checkout; the tests that need it skip if
    neither exists (no download: they check the bundled body against it)."""
    path = Path(os.environ.get(DRACULA_ENV) or GUTENBERG_DRACULA_FALLBACK)
    if not path.is_file():
        pytest.skip(f"no raw Gutenberg Dracula: set ${DRACULA_ENV} to a copy of pg345.txt")
    return path


@pytest.fixture(scope="session")
def small_text() -> str:
    """A few kB of varied English, enough for tiny models and fast tests."""
    words = (
        "the count said that the night was dark and the wolves were howling near the castle "
        "while jonathan wrote in his diary of the strange things he had seen that day "
        "mina and lucy walked by the sea at whitby where the ship came in with no crew "
    ).split()
    import numpy as np

    rng = np.random.default_rng(0)
    sentences = []
    for _ in range(400):
        n = int(rng.integers(5, 14))
        sentence = " ".join(words[int(i)] for i in rng.integers(0, len(words), n))
        sentences.append(sentence.capitalize() + ".")
    return " ".join(sentences) + "\n"


@pytest.fixture
def small_text_path(tmp_path, small_text) -> Path:
    path = tmp_path / "small.txt"
    path.write_text(small_text)
    return path


@pytest.fixture
def tiny_config(small_text_path, tmp_path):
    """A model small enough that a step takes milliseconds; quiet loop, no periodic saves."""
    from lstm_jax.config import Config

    return Config.create(
        data_path=str(small_text_path),
        workdir=str(tmp_path / "run"),
        embed_dim=8,
        hidden=16,
        num_layers=2,
        seq_len=16,
        global_batch=8,
        num_steps=8,
        warmup_steps=2,
        learning_rate=1e-2,
        log_every=4,
        eval_every=1000,
        checkpoint_every=1000,
        length=20,
    )


@pytest.fixture
def fast_compile():
    """XLA's optimisations mostly off, for tests of behaviour rather than speed: compiles in
    about half the time on CPU."""
    import jax

    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Free the XLA programs of each test file when it ends.

    Every XLA:CPU executable holds memory mappings of its code; the programs of the whole suite
    in one process pass the kernel's limit (vm.max_map_count, 65,530 here), and the next compile
    then crashes the process with a segmentation fault.
    """
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


@pytest.hookimpl(tryfirst=True)  # Before xdist reads the groups into the test ids.
def pytest_collection_modifyitems(config, items) -> None:
    """Under pytest-xdist, keep the tests that share a module-scoped fixture on one worker.

    With `-n 2` the tests of a file are spread over both workers, and each worker would then set
    up the file's trained workdir itself: twice the work for the slowest fixtures of the suite.
    An xdist_group per such file (honoured with --dist loadgroup, which pyproject.toml sets)
    keeps them together; every other test is still handed to whichever worker is free.
    """
    for item in items:
        definitions = getattr(item, "_fixtureinfo", None)
        if definitions is None:
            continue
        if any(
            defs[-1].scope == "module" and defs[-1].baseid.endswith(".py")
            for defs in definitions.name2fixturedefs.values()
        ):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
