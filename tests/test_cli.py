"""The ``voxtral`` command end to end on the tiny checkpoint: files of several formats and rates in, transcripts
out, and bad inputs reported in one line while the other files are still transcribed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from voxtral_realtime import load_audio
from voxtral_realtime.benchmarking.signals import speechlike
from voxtral_realtime.cli import main

from .test_audio import encode_with_pyav


def _stereo_at(rate: int, seconds: float, seed: int) -> np.ndarray:
    import av

    mono16k = speechlike(seconds, seed=seed)
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    frame = av.AudioFrame.from_ndarray(mono16k[None], format="flt", layout="mono")
    frame.sample_rate = 16000
    out = np.concatenate([f.to_ndarray().reshape(-1) for f in [*resampler.resample(frame), *resampler.resample(None)]])
    return np.stack([out, 0.5 * out], axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("audio")
    cases = {"talk.wav": ("wav", "pcm_s16le", 16000), "talk.flac": ("flac", "flac", 44100),
             "talk.mp3": ("mp3", "libmp3lame", 22050), "talk.ogg": ("ogg", "libopus", 48000),
             "talk.m4a": ("ipod", "aac", 8000), "talk.webm": ("webm", "libopus", 48000)}
    files = {}
    for name, (fmt, codec, rate) in cases.items():
        files[name] = root / name
        encode_with_pyav(files[name], fmt, codec, _stereo_at(rate, 3.0, seed=7), rate)
    return files


def test_transcribe_json_equals_api_for_every_format(tiny_short, checkpoints, audio_files, capsys):
    names = sorted(audio_files)
    code = main(["transcribe", *(str(audio_files[n]) for n in names), "--model", str(checkpoints["short"].mistral_dir),
                 "--device", "cpu", "--output-format", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    records = json.loads(out)
    assert [Path(r["file"]).name for r in records] == names
    for record in records:
        expected = tiny_short.transcribe(load_audio(record["file"]))
        assert record["tokens"] == expected.tokens
        assert record["text"] == expected.text
        assert record["delay_ms"] == 480
        assert record["duration"] == pytest.approx(3.0, abs=0.1)  # aac adds up to ~70 ms of padding


def test_txt_to_stdout_and_files_to_output_dir(tiny_short, checkpoints, audio_files, tmp_path, capsys):
    wav = audio_files["talk.wav"]
    expected = tiny_short.transcribe(wav, delay_ms=960).text.strip()
    assert main(["transcribe", str(wav), "--model", str(checkpoints["short"].mistral_dir), "--device", "cpu",
                 "--delay-ms", "960"]) == 0
    assert capsys.readouterr().out == expected + "\n"

    out_dir = tmp_path / "out"
    assert main(["transcribe", str(wav), str(audio_files["talk.flac"]), "--model",
                 str(checkpoints["short"].mistral_dir), "--device", "cpu", "--output-format", "json",
                 "--output-dir", str(out_dir)]) == 0
    assert capsys.readouterr().out == ""
    # the two files share a stem: each keeps its own transcript
    assert sorted(p.name for p in out_dir.iterdir()) == ["talk.flac.json", "talk.wav.json"]
    assert json.loads((out_dir / "talk.wav.json").read_text())["tokens"] == tiny_short.transcribe(wav).tokens


def test_bad_files_are_reported_and_the_rest_transcribed(checkpoints, audio_files, tmp_path, capsys):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not audio at all\n")
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    code = main(["transcribe", str(tmp_path / "missing.wav"), str(text_file), str(audio_files["talk.wav"]),
                 str(empty), str(tmp_path), "--model", str(checkpoints["short"].mistral_dir), "--device", "cpu",
                 "--output-format", "json"])
    out, err = capsys.readouterr()
    assert code == 1
    assert [Path(r["file"]).name for r in json.loads(out)] == ["talk.wav"]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 4, err
    for name in ("missing.wav", "notes.txt", "empty.wav", tmp_path.name):
        assert any(name in line for line in errors), (name, err)
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["transcribe", "x.wav", "--delay-ms", "100"], "not a delay the model supports"),
    (["transcribe", "x.wav", "--delay-ms", "soon"], "not a whole number"),
    (["transcribe", "x.wav", "--dtype", "f8"], "invalid choice"),
    (["transcribe"], "required"),
])
def test_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_only_missing_files_fails_before_loading_the_model(tmp_path, capsys):
    # The model does not exist either: the run must stop at the files, with no download attempted.
    assert main(["transcribe", str(tmp_path / "a.wav"), "--model", str(tmp_path / "no-model")]) == 1
    err = capsys.readouterr().err
    assert "a.wav: no such file" in err and "no-model" not in err


def test_console_scripts_and_rust_compatible_alias(tiny_short, checkpoints, audio_files):
    """The installed entry points, in a real process: ``voxtral-transcribe --audio FILE --model DIR``."""
    bindir = Path(sys.executable).parent
    wav = audio_files["talk.wav"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([str(bindir / "voxtral-transcribe"), "--audio", str(wav), "--model",
                          str(checkpoints["short"].mistral_dir), "--device", "cpu", "--output-format", "json"],
                         capture_output=True, text=True, env=env, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["tokens"] == tiny_short.transcribe(wav).tokens

    help_run = subprocess.run([str(bindir / "voxtral"), "transcribe", "--help"], capture_output=True, text=True,
                              timeout=120, check=False)
    assert help_run.returncode == 0 and "--delay-ms" in help_run.stdout and "examples:" in help_run.stdout


def test_a_bug_keeps_its_traceback_and_says_it_is_a_bug(monkeypatch, capsys):
    """Only a VoxtralError is a user's mistake: anything else propagates (traceback) after a line naming it a bug."""
    from voxtral_realtime.cli import download

    def broken(args):
        raise ValueError("an internal inconsistency")

    monkeypatch.setattr(download, "run", broken)
    with pytest.raises(ValueError, match="internal inconsistency"):
        main(["download", "some/repo"])
    assert "this is a bug" in capsys.readouterr().err


def test_a_usage_error_from_the_api_is_one_line_and_exit_code_2(monkeypatch, capsys):
    from voxtral_realtime.cli import download
    from voxtral_realtime.errors import UsageError

    def refuse(args):
        raise UsageError("delay 100 ms is not one the model was trained for")

    monkeypatch.setattr(download, "run", refuse)
    assert main(["download", "some/repo"]) == 2
    err = capsys.readouterr().err
    assert "error: delay 100 ms" in err and "Traceback" not in err and "bug" not in err


def test_quantize_takes_quant_and_the_old_type_spelling():
    from voxtral_realtime.cli import build_parser

    for flag in ("--quant", "--type"):
        args = build_parser().parse_args(["quantize", "src", "--out", "x.gguf", flag, "q4_k"])
        assert args.quant == "q4_k"
