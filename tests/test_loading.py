"""Checkpoint problems a user can cause are one clear line, from the API and from the command line.

Every bad case is a copy of the tiny test checkpoint with one thing broken.  The API must raise a
CheckpointError / DownloadError whose one-line message names the file or folder and says what is wrong; ``voxtral``
must print exactly that line after ``error:``, exit non-zero and show no traceback.  Bad cases must fail before the
tokenizer is read (seconds of work): the ``no_tokenizer`` fixture makes reading it fail the test.  That also lets
the broken copies carry a slim tekken.json (just its ``audio`` block) instead of the 11 MB one, which keeps each case
at a fraction of a second.

The good cases check what loading gives: the transformers layout and a bf16 checkpoint load to the same weights,
every weight is one contiguous tensor of its own on the requested device and dtype, and a Hugging Face Hub repo
id is served from the local cache (built here by hand, in the real cache layout) with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import time
import wave
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import voxtral_realtime
import voxtral_realtime.api
from voxtral_realtime import CheckpointError, DownloadError
from voxtral_realtime.benchmarking.signals import speechlike
from voxtral_realtime.cli import main

from .tiny_checkpoint import AUDIO_BLOCK, write_mistral_folder

# ---------------------------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture
def no_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading the tokenizer fails the test: a bad checkpoint must be reported before that (seconds of) work."""

    def refuse(path: object) -> None:
        raise AssertionError(f"the tokenizer {path} was read before the checkpoint problem was found")

    monkeypatch.setattr(voxtral_realtime.api, "Tokenizer", refuse)


@pytest.fixture(scope="module")
def audio_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real WAV for the CLI, which checks its audio files exist before it loads the model."""
    path = tmp_path_factory.mktemp("audio") / "speech.wav"
    samples = (speechlike(0.5, seed=1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
        f.writeframes(samples.tobytes())
    return path


def broken_copy(source: Path, dest: Path) -> Path:
    """``source`` copied to ``dest``, with a tekken.json that holds only the real ``audio`` block (quick to parse;
    the broken cases never get as far as the tokenizer, which would need the rest)."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("tekken.json"))
    (dest / "tekken.json").write_text(json.dumps({"audio": AUDIO_BLOCK}), encoding="utf-8")
    return dest


def api_error(model: str | Path, error: type[Exception], **kwargs: object) -> str:
    """The message of the ``error`` that ``voxtral_realtime.load(model)`` raises; it must be one line."""
    with pytest.raises(error) as info:
        voxtral_realtime.load(model, device="cpu", **kwargs)
    assert type(info.value) is error, repr(info.value)
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


def cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``voxtral argv`` in-process: it must fail with one ``error:`` line on stderr; returns the message."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code != 0
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert out == ""
    return lines[0].removeprefix("error: ")


def transcribe_argv(model: str | Path, audio: Path) -> list[str]:
    return ["transcribe", str(audio), "--model", str(model), "--device", "cpu", "--no-progress"]


def edit_json(path: Path, edit: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def edit_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def encoder_args(params: dict) -> dict:
    return params["multimodal"]["whisper_model_args"]["encoder_args"]


# ---------------------------------------------------------------------------------------------------------------
# Broken checkpoints: one problem each


@dataclass(frozen=True)
class Case:
    layout: str  # which fixture folder is copied: "mistral" or "hf"
    damage: Callable[[Path], object]  # breaks the copy in place
    names: str  # what the message must name: a file of the copy, or "" for the folder itself
    says: str  # regular expression the message must contain: what is wrong


MISTRAL_WEIGHTS = "consolidated.safetensors"
WQ = "layers.0.attention.wq.weight"  # [64, 64] in the tiny model


def _cut(name: str, keep: Callable[[int], int]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:keep(len(data))])
    return damage


def _write(name: str, content: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(content)


def _remove(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).unlink()


def _params(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    return lambda folder: edit_json(folder / "params.json", edit)


def _hf_config(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    return lambda folder: edit_json(folder / "config.json", edit)


NOT_SAFETENSORS = r": not a readable safetensors file \(.+\); the download may be incomplete$"

CASES = {
    # Mistral layout: files missing
    "no tekken.json": Case("mistral", _remove("tekken.json"), "", "Mistral-format checkpoint is missing tekken.json"),
    "no params.json": Case("mistral", _remove("params.json"), "", "Mistral-format checkpoint is missing params.json"),
    "no weights": Case("mistral", _remove(MISTRAL_WEIGHTS), "",
                       "Mistral-format checkpoint is missing consolidated.safetensors"),
    # the weight file damaged
    "weights truncated": Case("mistral", _cut(MISTRAL_WEIGHTS, lambda n: n - 100), MISTRAL_WEIGHTS, NOT_SAFETENSORS),
    "weights cut in the header": Case("mistral", _cut(MISTRAL_WEIGHTS, lambda n: 1000), MISTRAL_WEIGHTS,
                                      NOT_SAFETENSORS),
    "weights are garbage": Case("mistral", _write(MISTRAL_WEIGHTS, random.Random(0).randbytes(100_000)),
                                MISTRAL_WEIGHTS, NOT_SAFETENSORS),
    "weights are an HTML page": Case("mistral", _write(MISTRAL_WEIGHTS, b"<!DOCTYPE html><html>Not Found</html>\n"),
                                     MISTRAL_WEIGHTS, NOT_SAFETENSORS),
    "weights zero bytes": Case("mistral", _write(MISTRAL_WEIGHTS, b""), MISTRAL_WEIGHTS, NOT_SAFETENSORS),
    "tensor of the wrong shape": Case(
        "mistral", lambda f: edit_tensors(f / MISTRAL_WEIGHTS, lambda t: t.update({WQ: torch.zeros(32, 64)})), "",
        re.escape(f"tensor {WQ} has shape [32, 64], expected [64, 64] from its params.json")),
    "tensor missing": Case(
        "mistral", lambda f: edit_tensors(f / MISTRAL_WEIGHTS, lambda t: t.pop("layers.1.feed_forward.w2.weight")), "",
        re.escape("checkpoint lacks tensor(s) layers.1.feed_forward.w2.weight; it does not match its params.json")),
    # params.json that does not match the weights
    "params n_layers too high": Case("mistral", _params(lambda p: p.update(n_layers=3)), "",
                                     r"lacks tensor\(s\) layers\.2\..* and 8 more; it does not match its params\.json"),
    "params n_layers too low": Case("mistral", _params(lambda p: p.update(n_layers=1)), "",
                                    r"checkpoint has more layers than its params\.json says \(it also has layers\.1\."),
    "params encoder n_layers too low": Case("mistral", _params(lambda p: encoder_args(p).update(n_layers=1)), "",
                                            r"more layers than its params\.json says .*transformer\.layers\.1\."),
    "params dim": Case("mistral", _params(lambda p: p.update(dim=128)), "",
                       r"tensor \S+ has shape \[\d+, \d+\], expected \[\d+, \d+\] from its params\.json"),
    "params encoder hidden_dim": Case(
        "mistral", _params(lambda p: encoder_args(p).update(hidden_dim=100)), "",
        re.escape("tensor mm_streams_embeddings.embedding_module.whisper_encoder.transformer.layers.0.feed_forward."
                  "w1.weight has shape [256, 64], expected [100, 64] from its params.json")),
    # params.json unreadable
    "params not JSON": Case("mistral", _write("params.json", b"{dim: 64,"), "params.json", r": not valid JSON \("),
    "params empty": Case("mistral", _write("params.json", b""), "params.json", r": not valid JSON \("),
    "params binary": Case("mistral", _write("params.json", b"\xff\xfe\x00\x01"), "params.json", r": not valid JSON \("),
    "params a list": Case("mistral", _write("params.json", b"[64, 2]"), "params.json", r": expected a JSON object$"),
    "params without dim": Case("mistral", _params(lambda p: p.pop("dim")), "",
                               r": params\.json is not a Voxtral Realtime config: missing or bad field 'dim'$"),
    "params without encoder": Case("mistral", _params(lambda p: p.pop("multimodal")), "",
                                   r": params\.json is not a Voxtral Realtime config: missing or bad field "
                                   r"'multimodal'$"),
    "params dim not a number": Case("mistral", _params(lambda p: p.update(dim="sixty-four")), "",
                                    r": params\.json is not a Voxtral Realtime config: missing or bad field"),
    # tekken.json
    "tekken not JSON": Case("mistral", _write("tekken.json", b'{"audio": {'), "tekken.json", r": not valid JSON \("),
    "tekken without audio": Case("mistral", _write("tekken.json", b'{"config": {}, "vocab": []}'), "tekken.json",
                                 r": tokenizer has no 'audio' section; not a Voxtral Realtime tokenizer$"),
    # transformers layout
    "hf without weights": Case("hf", _remove("model.safetensors"), "",
                               re.escape(": config.json found but no model*.safetensors weights")),
    "hf without tekken": Case("hf", _remove("tekken.json"), "", r": transformers checkpoint without tekken\.json"),
    "hf weights truncated": Case("hf", _cut("model.safetensors", lambda n: n // 2), "model.safetensors",
                                 NOT_SAFETENSORS),
    "hf config hidden_size": Case("hf", _hf_config(lambda c: c["text_config"].update(hidden_size=128)), "",
                                  r"tensor \S+ has shape \[\d+, \d+\], expected \[\d+, \d+\] from its config\.json"),
    "hf config too few layers": Case("hf", _hf_config(lambda c: c["text_config"].update(num_hidden_layers=1)), "",
                                     r"more layers than its config\.json says \(it also has "
                                     r"\S*language_model\S*layers\.1\."),
    "hf config too many layers": Case("hf", _hf_config(lambda c: c["audio_config"].update(num_hidden_layers=3)), "",
                                      r"lacks tensor\(s\) \S*audio_tower\.layers\.2\..*it does not match its "
                                      r"config\.json$"),
    "hf config not JSON": Case("hf", _write("config.json", b"<html>"), "config.json", r": not valid JSON \("),
    "hf config without text_config": Case("hf", _hf_config(lambda c: c.pop("text_config")), "",
                                          r": config\.json is not a Voxtral Realtime config: missing or bad field "
                                          r"'text_config'$"),
    "hf config of another model": Case("hf", _hf_config(lambda c: c.update(model_type="llama")), "",
                                       r": config\.json: model_type 'llama' is not voxtral_realtime$"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_broken_checkpoint_is_one_line(case: Case, checkpoints, tmp_path: Path, audio_file: Path, no_tokenizer,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    source = checkpoints["short"].mistral_dir if case.layout == "mistral" else checkpoints["short"].hf_dir
    folder = broken_copy(source, tmp_path / "model")
    case.damage(folder)
    message = api_error(folder, CheckpointError)
    named = folder / case.names if case.names else folder
    assert message.startswith((f"{named}:", f"{named} ")), message
    assert re.search(case.says, message), message
    assert cli_error(transcribe_argv(folder, audio_file), capsys) == message


def _folder_with_other_files(tmp_path: Path) -> Path:
    (tmp_path / "README.md").write_text("my model\n")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0" * 64)
    return tmp_path


PATH_CASES = {
    "no such folder": (lambda tmp, src: tmp / "nowhere" / "voxtral", "no such folder"),
    "relative path that does not exist": (lambda tmp, src: "./voxtral-mini", "no such folder"),
    "a file": (lambda tmp, src: src / "params.json", "is a file; pass the folder holding params.json or config.json"),
    "empty folder": (lambda tmp, src: tmp, "not a Voxtral checkpoint"),
    "folder of other files": (lambda tmp, src: _folder_with_other_files(tmp), "not a Voxtral checkpoint"),
}


@pytest.mark.parametrize("make, says", PATH_CASES.values(), ids=PATH_CASES.keys())
def test_bad_model_path_is_one_line(make, says: str, checkpoints, tmp_path: Path, audio_file: Path, no_tokenizer,
                                    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    model = make(tmp_path, checkpoints["short"].mistral_dir)  # the shared folder is only read
    message = api_error(model, CheckpointError)
    assert message.startswith(f"{model}: ") and says in message, message
    assert cli_error(transcribe_argv(model, audio_file), capsys) == message


@pytest.mark.parametrize("name", ["model[old]", "model[/v2]"])
def test_message_with_brackets_is_printed_as_is(name: str, checkpoints, tmp_path: Path, audio_file: Path,
                                                no_tokenizer, capsys: pytest.CaptureFixture[str]) -> None:
    folder = broken_copy(checkpoints["short"].mistral_dir, tmp_path / name)
    (folder / "params.json").unlink()
    message = api_error(folder, CheckpointError)
    assert str(folder) in message
    assert cli_error(transcribe_argv(folder, audio_file), capsys) == message


# ---------------------------------------------------------------------------------------------------------------
# Good checkpoints: what loading gives


def assert_owns_its_weights(model: voxtral_realtime.Model, device: torch.device, dtype: torch.dtype) -> None:
    """Every weight is contiguous, on ``device`` in ``dtype``, and alone in its memory: not a view of a bigger
    buffer (the file mapping, a fused matrix before slicing) and not shared with another weight."""
    seen: dict[int, str] = {}
    for name, param in model.network.named_parameters():
        assert param.device == device and param.dtype == dtype, (name, param.device, param.dtype)
        assert param.is_contiguous(), name
        storage = param.untyped_storage()
        assert storage.nbytes() == param.numel() * param.element_size(), f"{name} is a view of a larger buffer"
        assert storage.data_ptr() not in seen, f"{name} shares memory with {seen[storage.data_ptr()]}"
        seen[storage.data_ptr()] = name
    assert all(b.device == device for b in model.network.buffers())
    assert model.device == device and model.dtype == dtype


def test_mistral_folder_gives_single_copies(tiny_short) -> None:
    assert_owns_its_weights(tiny_short, torch.device("cpu"), torch.float32)


@pytest.fixture
def shared_tokenizer(monkeypatch: pytest.MonkeyPatch, tiny_short, tekken_path: Path) -> None:
    """Loads reuse ``tiny_short``'s tokenizer when their tekken.json holds the same bytes: reading one costs
    seconds, and these tests are about the weights.  (The Hub test below reads its own.)"""
    real, reference = voxtral_realtime.api.Tokenizer, tekken_path.read_bytes()

    def tokenizer(path: Path) -> object:
        return tiny_short.tokenizer if Path(path).read_bytes() == reference else real(path)

    monkeypatch.setattr(voxtral_realtime.api, "Tokenizer", tokenizer)


def test_transformers_folder_loads(checkpoints, tiny_short, shared_tokenizer) -> None:
    model = voxtral_realtime.load(checkpoints["short"].hf_dir, device="cpu")
    assert_owns_its_weights(model, torch.device("cpu"), torch.float32)  # f32: the CPU default
    reference = dict(tiny_short.network.named_parameters())
    for name, param in model.network.named_parameters():
        assert torch.equal(param, reference[name]), name


@pytest.fixture(scope="module")
def bf16_dir(checkpoints, tekken_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The short checkpoint stored in bf16, as Mistral publishes the real one."""
    folder = write_mistral_folder(checkpoints["short"].hf_model, tmp_path_factory.mktemp("bf16") / "mistral",
                                  tekken_path, dtype=torch.bfloat16)
    assert {t.dtype for t in load_file(str(folder / MISTRAL_WEIGHTS)).values()} == {torch.bfloat16}
    return folder


@pytest.mark.parametrize("dtype, expected", [("f32", torch.float32), ("bf16", torch.bfloat16)])
def test_bf16_folder_loads_as(dtype: str, expected: torch.dtype, bf16_dir: Path, tiny_short,
                              shared_tokenizer) -> None:
    model = voxtral_realtime.load(bf16_dir, device="cpu", dtype=dtype)
    assert model.dtype == expected
    assert_owns_its_weights(model, torch.device("cpu"), expected)
    reference = dict(tiny_short.network.named_parameters())
    for name, param in model.network.named_parameters():
        # exactly the f32 weights rounded to bf16 (row permutation and concatenation commute with rounding)
        assert torch.equal(param, reference[name].to(torch.bfloat16).to(expected)), name


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face Hub: the local cache, offline mode, no network

COMMIT = "0123456789abcdef0123456789abcdef01234567"
MISTRAL_FILES = ("consolidated.safetensors", "params.json", "tekken.json")
HF_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "tekken.json")


def populate_hub_cache(cache: Path, repo_id: str, source: Path, files: tuple[str, ...]) -> Path:
    """Write ``files`` of ``source`` into ``cache`` as huggingface_hub does: content-named blobs, the snapshot's
    files as relative symlinks to them, refs/main holding the commit.  Returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)  # no newline, like the hub
    for name in files:
        data = (source / name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


@pytest.fixture
def hub_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """HF_HUB_OFFLINE=1, also for huggingface_hub's constant (read once, when it was imported)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # "org/name" must not be a folder here


def test_offline_without_cache_is_one_line(hub_offline, tmp_path: Path, audio_file: Path, no_tokenizer,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    message = api_error("someorg/somemodel", DownloadError, cache_dir=str(cache))
    assert message.startswith("someorg/somemodel: ")
    assert "HF_HUB_OFFLINE" in message and "local cache" in message, message
    assert cli_error(["download", "someorg/somemodel", "--cache-dir", str(cache)], capsys) == message


def test_offline_from_populated_cache_gives_the_same_tokens(hub_offline, checkpoints, tiny_short,
                                                            tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    snapshot = populate_hub_cache(cache, "org/name", checkpoints["short"].mistral_dir, MISTRAL_FILES)
    model = voxtral_realtime.load("org/name", device="cpu", cache_dir=str(cache))
    assert Path(model.source) == snapshot
    audio = speechlike(2.0, seed=5)
    assert model.transcribe(audio).tokens == tiny_short.transcribe(audio).tokens


@pytest.mark.parametrize("layout, files", [("mistral", MISTRAL_FILES), ("hf", HF_FILES)])
def test_cli_download_offline_prints_the_cached_snapshot(layout: str, files: tuple[str, ...], hub_offline,
                                                          checkpoints, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    source = checkpoints["short"].mistral_dir if layout == "mistral" else checkpoints["short"].hf_dir
    snapshot = populate_hub_cache(tmp_path / "hub", "org/name", source, files)
    assert main(["download", "org/name", "--cache-dir", str(tmp_path / "hub")]) == 0
    out, err = capsys.readouterr()
    assert out == f"{snapshot}\n"
    assert "error" not in err.lower()


def test_interrupted_download_in_cache_is_one_line(hub_offline, checkpoints, tmp_path: Path, audio_file: Path,
                                                   no_tokenizer, capsys: pytest.CaptureFixture[str]) -> None:
    """The weights never arrived: the snapshot has params.json and tekken.json only."""
    snapshot = populate_hub_cache(tmp_path / "hub", "org/name", checkpoints["short"].mistral_dir,
                                  ("params.json", "tekken.json"))
    message = api_error("org/name", CheckpointError, cache_dir=str(tmp_path / "hub"))
    assert message == f"{snapshot}: Mistral-format checkpoint is missing consolidated.safetensors"


class _TooSlow(BaseException):
    pass


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Skip the test, rather than hang it, when the network neither answers nor fails within ``seconds``."""

    def alarm(signum: int, frame: object) -> None:
        raise _TooSlow

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    except _TooSlow:
        pytest.skip(f"the Hub neither answered nor failed within {seconds} s")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_unreachable_hub_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_tokenizer,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Online mode, unknown repo: without a network (this machine) the Hub cannot be reached; with one, the
    repo does not exist.  Either way a DownloadError naming the repo, never a traceback."""
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"):
        monkeypatch.setenv(name, "2")
        monkeypatch.setattr(constants, name, 2)
    monkeypatch.chdir(tmp_path)
    repo = "voxtral-realtime-tests/no-such-model-4f7c2a"
    start = time.monotonic()
    with time_limit(10):
        message = api_error(repo, DownloadError, cache_dir=str(tmp_path / "cache"))
        assert message.startswith(f"{repo}: "), message
        assert cli_error(["download", repo, "--cache-dir", str(tmp_path / "cache")], capsys) == message
    assert time.monotonic() - start < 10
