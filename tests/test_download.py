"""The README's first command end to end: ``voxtral download`` / ``voxtral transcribe`` against a Hub.

The Hub is tests/hub_server.py on 127.0.0.1, reached through ``HF_ENDPOINT`` as a user would set it, in a real
``voxtral`` process.  It serves a tiny random checkpoint under the real repo id with both of the real repo's
copies of the weights: the Mistral files (params.json, consolidated.safetensors, tekken.json) and the transformers
files (config.json, model.safetensors, ...).  The tiny model keeps the real 131072-token vocabulary, which makes
consolidated.safetensors about 35 MB: several of huggingface_hub's 10 MB download chunks, so that a resumed
download can be told from a restarted one.  Each test checks what the user sees (stdout, stderr, exit code) and
what lands on disk (the Hugging Face cache), and counts the bytes the Hub served.
"""

from __future__ import annotations

import hashlib
import os
import re
import resource
import shutil
import subprocess
import sys
import time
import wave
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from huggingface_hub import constants as hub_constants

from voxtral_realtime.benchmarking.signals import speechlike
from voxtral_realtime.cli import main
from voxtral_realtime.loading import DEFAULT_MODEL

from .hub_server import LocalHub
from .tiny_checkpoint import make_hf_model, write_hf_folder, write_mistral_folder

REPO = DEFAULT_MODEL
WEIGHTS = "consolidated.safetensors"
MISTRAL_FILES = {"consolidated.safetensors", "params.json", "tekken.json"}
CHUNK = hub_constants.DOWNLOAD_CHUNK_SIZE  # what huggingface_hub writes to disk at a time


@pytest.fixture(scope="module")
def hub_checkpoint(tmp_path_factory: pytest.TempPathFactory, tekken_path: Path) -> dict[str, Path]:
    """The tiny model with the real vocabulary, in both layouts."""
    model = make_hf_model(encoder_window=12, decoder_window=10, seed=2602)
    root = tmp_path_factory.mktemp("hub-checkpoint")
    folders = {"mistral": write_mistral_folder(model, root / "mistral", tekken_path),
               "hf": write_hf_folder(model, root / "hf", tekken_path)}
    assert (folders["mistral"] / WEIGHTS).stat().st_size > 3 * CHUNK
    return folders


@pytest.fixture(scope="module")
def hub_server(hub_checkpoint: dict[str, Path], checkpoints) -> LocalHub:
    with LocalHub() as hub:
        repo_files = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
                      "README.md": b"---\nlicense: apache-2.0\n---\n# Voxtral Mini 4B Realtime (test copy)\n"}
        small = checkpoints["short"]  # an older commit: other weights, a smaller vocabulary
        hub.add_commit(REPO, {**repo_files, **_files(small.mistral_dir), **_files(small.hf_dir)},
                       refs=("v0.1", "small-vocab"))
        hub.add_commit(REPO, {**repo_files, **_files(hub_checkpoint["mistral"]), **_files(hub_checkpoint["hf"])})
        hub.add_commit("someorg/voxtral-transformers", _files(small.hf_dir))
        yield hub


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def hub(hub_server: LocalHub) -> LocalHub:
    hub_server.reset()
    yield hub_server
    hub_server.release()  # a stalled response of a failed test must not hold its thread


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """HF_HOME of the test's ``voxtral`` processes: its cache is home/hub."""
    return tmp_path / "hf-home"


@pytest.fixture(scope="module")
def audio_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("audio") / "speech.wav"
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
        f.writeframes((speechlike(1.0, seed=3) * 32767).astype("<i2").tobytes())
    return path


def hub_env(hub: LocalHub, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE",
                        "HUGGINGFACE_HUB_CACHE")}
    return {**env, "HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1",
            "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}


VOXTRAL = [sys.executable, "-m", "voxtral_realtime.cli"]


def voxtral(hub: LocalHub, home: Path, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """``voxtral args`` in its own process, stdout and stderr piped."""
    return subprocess.run([*VOXTRAL, *args], env=hub_env(hub, home), capture_output=True, text=True, timeout=300,
                          check=False, **kwargs)


def repo_cache(home: Path, repo: str = REPO) -> Path:
    return home / "hub" / ("models--" + repo.replace("/", "--"))


def commit_of(hub: LocalHub, ref: str = "main", repo: str = REPO) -> str:
    return hub.repos[repo].refs[ref]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error_line(run: subprocess.CompletedProcess[str]) -> str:
    """The run failed with exactly one ``error:`` line on stderr and nothing on stdout; returns its message."""
    assert run.returncode == 1, (run.returncode, run.stderr)
    assert "Traceback" not in run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert run.stdout == ""
    return lines[0].removeprefix("error: ")


# ---------------------------------------------------------------------------------------------------------------
# Downloading: the files we load, nothing else, quietly in a pipe


@dataclass
class Downloaded:
    home: Path
    run: subprocess.CompletedProcess[str]
    served: Counter[str]
    requests: list[tuple[str, str, str | None]]


@pytest.fixture(scope="module")
def downloaded(hub_server: LocalHub, tmp_path_factory: pytest.TempPathFactory) -> Downloaded:
    """One ``voxtral download`` into an empty cache: what it printed and what the Hub served; tests that need a
    full cache copy its home."""
    hub_server.reset()
    home = tmp_path_factory.mktemp("downloaded") / "hf-home"
    run = voxtral(hub_server, home, "download")
    return Downloaded(home, run, Counter(hub_server.served), list(hub_server.requests))


def copy_of(downloaded: Downloaded, home: Path) -> Path:
    shutil.copytree(downloaded.home, home, symlinks=True)
    return home


def test_download_fetches_only_the_mistral_files(hub: LocalHub, downloaded: Downloaded, hub_checkpoint,
                                                 home: Path) -> None:
    run, commit, cache = downloaded.run, commit_of(hub), repo_cache(downloaded.home)
    snapshot = cache / "snapshots" / commit
    assert run.returncode == 0, run.stderr
    assert run.stdout == f"{snapshot}\n"
    assert run.stderr == ""  # in a pipe: no progress bar, no warnings
    assert {p.name for p in snapshot.iterdir()} == MISTRAL_FILES
    for name in MISTRAL_FILES:
        assert (snapshot / name).read_bytes() == (hub_checkpoint["mistral"] / name).read_bytes(), name
    assert (cache / "refs" / "main").read_text() == commit
    # the transformers copy of the weights was neither served nor stored
    assert set(downloaded.served) == MISTRAL_FILES
    assert not any("/resolve/" in path and "model" in path.rsplit("/", 1)[1] for _, path, _ in downloaded.requests)
    blob_sizes = sorted(p.stat().st_size for p in (cache / "blobs").iterdir())
    assert blob_sizes == sorted((hub_checkpoint["mistral"] / name).stat().st_size for name in MISTRAL_FILES)

    # again: everything is in the cache and checked, nothing is fetched
    again = voxtral(hub, copy_of(downloaded, home), "download")
    assert (again.returncode, again.stdout, again.stderr) == (0, f"{repo_cache(home) / 'snapshots' / commit}\n", "")
    assert not hub.served


def test_a_transformers_only_repo_gives_its_transformers_files(hub: LocalHub, home: Path) -> None:
    repo = "someorg/voxtral-transformers"
    run = voxtral(hub, home, "download", repo)
    assert run.returncode == 0, run.stderr
    snapshot = Path(run.stdout.strip())
    assert {p.name for p in snapshot.iterdir()} == {"config.json", "model.safetensors", "preprocessor_config.json",
                                                    "tekken.json"}  # not generation_config.json
    assert snapshot == repo_cache(home, repo) / "snapshots" / commit_of(hub, repo=repo)


def test_transcribe_downloads_then_prints_the_text_of_the_local_folder(hub: LocalHub, home: Path, hub_checkpoint,
                                                                       audio_file: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    run = voxtral(hub, home, "transcribe", str(audio_file), "--device", "cpu")
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    assert main(["transcribe", str(audio_file), "--device", "cpu", "--model", str(hub_checkpoint["mistral"])]) == 0
    local = capsys.readouterr().out
    assert local.strip()
    assert run.stdout == local
    snapshot = repo_cache(home) / "snapshots" / commit_of(hub)
    assert {p.name for p in snapshot.iterdir()} == MISTRAL_FILES
    assert set(hub.served) == MISTRAL_FILES


# ---------------------------------------------------------------------------------------------------------------
# Interrupted and damaged downloads


def test_killed_download_resumes_without_fetching_the_bytes_it_has(hub: LocalHub, home: Path,
                                                                   hub_checkpoint) -> None:
    size = (hub_checkpoint["mistral"] / WEIGHTS).stat().st_size
    stall_at = 2 * CHUNK + CHUNK // 2  # the Hub stops sending here: two chunks are on disk, half a chunk in memory
    hub.stall = (WEIGHTS, stall_at)
    process = subprocess.Popen([*VOXTRAL, "download"], env=hub_env(hub, home), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        hub.wait_served(WEIGHTS, stall_at)
        partial = _wait_for_partial(repo_cache(home) / "blobs", at_least=2 * CHUNK)
    finally:
        process.kill()
        process.communicate()
    hub.release()
    kept = partial.stat().st_size
    assert 2 * CHUNK <= kept <= stall_at

    hub.reset()
    run = voxtral(hub, home, "download")
    assert run.returncode == 0, run.stderr
    missing = size - stall_at
    assert hub.served[WEIGHTS] <= missing + CHUNK  # the bar: the missing bytes plus one chunk at most
    assert hub.served[WEIGHTS] == size - kept  # exactly what the partial file lacked
    assert [r for m, p, r in hub.requests if m == "GET" and p.endswith(WEIGHTS)] == [f"bytes={kept}-"]
    weights = Path(run.stdout.strip()) / WEIGHTS
    assert sha256(weights) == sha256(hub_checkpoint["mistral"] / WEIGHTS)
    assert not list((repo_cache(home) / "blobs").glob("*.incomplete"))


def _wait_for_partial(blobs: Path, at_least: int, timeout: float = 60.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for partial in blobs.glob("*.incomplete") if blobs.is_dir() else []:
            if partial.stat().st_size >= at_least:
                return partial
        time.sleep(0.02)
    raise TimeoutError(f"no partial download of {at_least} bytes in {blobs}")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1000])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip_a_byte], ids=["truncated", "same size, one byte changed"])
def test_damaged_cached_weights_are_fetched_again(damage, hub: LocalHub, downloaded: Downloaded, home: Path,
                                                  hub_checkpoint) -> None:
    home = copy_of(downloaded, home)
    snapshot = repo_cache(home) / "snapshots" / commit_of(hub)
    weights = snapshot / WEIGHTS
    damage(weights.resolve())
    run = voxtral(hub, home, "download")
    assert (run.returncode, run.stdout, run.stderr) == (0, f"{snapshot}\n", "")
    assert sha256(weights) == sha256(hub_checkpoint["mistral"] / WEIGHTS)
    assert set(hub.served) == {WEIGHTS} and hub.served[WEIGHTS] == weights.stat().st_size


def test_a_corrupted_transfer_is_one_line(hub: LocalHub, home: Path) -> None:
    hub.corrupt = {WEIGHTS}
    message = one_error_line(voxtral(hub, home, "download"))
    assert message == (f"{REPO}: {WEIGHTS} does not match the Hub's sha256 after downloading (a corrupted "
                       "transfer); run the same command again")
    assert not (repo_cache(home) / "snapshots").exists() or not any((repo_cache(home) / "snapshots").rglob(WEIGHTS))
    assert not list((repo_cache(home) / "blobs").iterdir())  # the bad bytes are not kept to resume from


# ---------------------------------------------------------------------------------------------------------------
# The Hub says no: one line each, naming the repo and what to do

REFUSALS = {
    "401 private or missing, not logged in": ("private", (), "no such model on the Hugging Face Hub (or it is "
                                                             "private: log in with `hf auth login`)"),
    "401 bad token": ("bad-token", (), "the Hub did not accept your token (401 Unauthorized); log in again with "
                                       "`hf auth login`, or unset HF_TOKEN"),
    "403 gated": ("gated", (), "the model is gated; accept its terms on its Hugging Face page and log in with "
                               "`hf auth login`"),
    "404 no such repo": (None, ("voxtral-tests/no-such-model",), "no such model on the Hugging Face Hub (or it is "
                                                                 "private: log in with `hf auth login`)"),
    "404 no such revision": (None, ("--revision", "v9"), "no revision 'v9' (a branch, tag or commit) on the Hub; "
                                                         "check the name, or leave it out for the main branch"),
}


@pytest.mark.parametrize("refusal, args, says", REFUSALS.values(), ids=REFUSALS.keys())
def test_hub_refusals_are_one_line(refusal: str | None, args: tuple[str, ...], says: str, hub: LocalHub,
                                   home: Path) -> None:
    hub.repos[REPO].refusal = refusal
    repo = args[0] if args and not args[0].startswith("-") else REPO
    message = one_error_line(voxtral(hub, home, "download", *args))
    assert message == f"{repo}: {says}"
    assert not hub.served


# ---------------------------------------------------------------------------------------------------------------
# The disk says no


def test_unwritable_cache_is_one_line(hub: LocalHub, tmp_path: Path) -> None:
    """HF_HOME in a folder the user may not write to: made read-only, or, for root (whom permissions do not stop),
    under /sys, where no one may make a folder."""
    if os.geteuid() == 0:
        home = Path("/sys/voxtral-test-cache")
    else:
        home = tmp_path / "read-only"
        home.mkdir()
        home.chmod(0o555)
    message = one_error_line(voxtral(hub, home, "download"))
    assert re.fullmatch(rf"{re.escape(REPO)}: cannot write to the cache folder \((Permission denied|Operation not "
                        rf"permitted): {re.escape(str(home))}\S*\); choose a writable one \(--cache-dir, or the "
                        r"HF_HOME environment variable\)", message), message
    assert not hub.served


def test_full_disk_is_one_line_and_keeps_what_was_downloaded(hub: LocalHub, home: Path, hub_checkpoint) -> None:
    """A full disk, simulated with a file size limit (RLIMIT_FSIZE) on the process: past it a write fails with
    EFBIG, as one on a full disk fails with ENOSPC (Python ignores SIGXFSZ, which would kill it)."""
    limit = CHUNK + CHUNK // 2

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    message = one_error_line(voxtral(hub, home, "download", preexec_fn=limit_file_size))
    assert re.fullmatch(rf"{re.escape(REPO)}: the disk is full \(File too large\) writing "
                        rf"{re.escape(str(home))}\S*; what was downloaded is kept: free some space or choose another "
                        r"cache folder \(--cache-dir, or the HF_HOME environment variable\), then run the same command "
                        r"again", message), message
    [partial] = (repo_cache(home) / "blobs").glob("*.incomplete")
    kept = partial.stat().st_size
    assert CHUNK <= kept <= limit

    hub.reset()  # with room again, the same command resumes
    run = voxtral(hub, home, "download")
    assert run.returncode == 0, run.stderr
    assert hub.served[WEIGHTS] == (hub_checkpoint["mistral"] / WEIGHTS).stat().st_size - kept


def test_not_enough_free_space_is_one_line_before_downloading(hub: LocalHub, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """In this process (the Hub's address patched in as HF_ENDPOINT would set it): the disk reports 1 MB free."""
    import shutil

    _use_hub_here(monkeypatch, hub)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1_000_000))
    assert main(["download", "--cache-dir", str(tmp_path / "cache")]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert re.fullmatch(rf"error: {re.escape(REPO)}: not enough disk space in \S+: the download needs \d+\.\d MB "
                        r"more, 1\.0 MB is free; free some space or choose another cache folder \(--cache-dir, or "
                        r"the HF_HOME environment variable\)\n", err), err
    assert set(hub.served) <= {"params.json"}  # no weights


def _use_hub_here(monkeypatch: pytest.MonkeyPatch, hub: LocalHub) -> None:
    """What HF_ENDPOINT does when huggingface_hub is imported, for this (already importing) process."""
    monkeypatch.setattr(hub_constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    for name in ("HF_HUB_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")


# ---------------------------------------------------------------------------------------------------------------
# Revisions


@pytest.mark.parametrize("revision", ["v0.1", "small-vocab", "commit"], ids=["tag", "branch", "commit"])
def test_download_revision(revision: str, hub: LocalHub, home: Path, checkpoints) -> None:
    commit = commit_of(hub, "v0.1")
    revision = commit if revision == "commit" else revision
    run = voxtral(hub, home, "download", "--revision", revision)
    assert run.returncode == 0, run.stderr
    snapshot = repo_cache(home) / "snapshots" / commit
    assert run.stdout == f"{snapshot}\n"
    assert (snapshot / WEIGHTS).read_bytes() == (checkpoints["short"].mistral_dir / WEIGHTS).read_bytes()
    refs = repo_cache(home) / "refs"
    assert {p.name: p.read_text() for p in refs.glob("*")} == ({} if revision == commit else {revision: commit})


def test_transcribe_revision(hub: LocalHub, home: Path, tiny_short, audio_file: Path) -> None:
    run = voxtral(hub, home, "transcribe", str(audio_file), "--device", "cpu", "--revision", "small-vocab")
    assert run.returncode == 0, run.stderr
    assert run.stdout == tiny_short.transcribe(audio_file).text.strip() + "\n"
    assert (repo_cache(home) / "refs" / "small-vocab").read_text() == commit_of(hub, "v0.1")


def test_load_revision(hub: LocalHub, tmp_path: Path, tiny_short, monkeypatch: pytest.MonkeyPatch) -> None:
    import voxtral_realtime

    _use_hub_here(monkeypatch, hub)
    stages: list[str] = []
    model = voxtral_realtime.load(REPO, revision=commit_of(hub, "v0.1"), device="cpu", cache_dir=str(tmp_path),
                                  status=stages.append)
    assert Path(model.source) == tmp_path / "models--mistralai--Voxtral-Mini-4B-Realtime-2602" / "snapshots" / \
        commit_of(hub, "v0.1")
    assert stages == ["reading the tokenizer", "loading weights"]
    audio = speechlike(1.0, seed=4)
    assert model.transcribe(audio).tokens == tiny_short.transcribe(audio).tokens


# ---------------------------------------------------------------------------------------------------------------
# Progress on a terminal


def test_terminal_shows_one_download_bar_with_bytes_rate_and_time_left(hub: LocalHub, home: Path) -> None:
    import pty

    hub.bytes_per_second = 25e6  # the 35 MB file takes over a second: the bar is drawn several times
    controller, terminal = pty.openpty()
    env = {**hub_env(hub, home), "TERM": "xterm", "COLUMNS": "160"}
    process = subprocess.Popen([*VOXTRAL, "download"], env=env, stdin=terminal, stdout=terminal, stderr=terminal)
    os.close(terminal)
    shown = b""
    while True:
        try:
            data = os.read(controller, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not data:
            break
        shown += data
    os.close(controller)
    assert process.wait(timeout=60) == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.decode("utf-8", "replace"))
    frames = [line for line in re.split(r"[\r\n]+", text) if "downloading" in line]
    assert frames, text
    assert any(re.search(r"\d+(\.\d+)?/\d+(\.\d+)? MB .*\d+(\.\d+)? MB/s .*\d:\d\d:\d\d", f) for f in frames), frames
    assert not re.search(r"Fetching|Downloading|Reconstructing|it/s|\|#", text), text  # no huggingface_hub bars
    assert text.strip().endswith(str(repo_cache(home) / "snapshots" / commit_of(hub))), text


def test_revision_of_a_local_folder_is_one_line(checkpoints, audio_file: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    folder = checkpoints["short"].mistral_dir
    assert main(["transcribe", str(audio_file), "--model", str(folder), "--revision", "v0.1", "--device", "cpu"]) == 1
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"error: {folder}: a local folder has no revisions; a revision is for Hub repo ids "
                              "only\n")
