"""`voxtral bench` end to end on the tiny model (CPU): the harness runs every part and its numbers are
consistent with the API's own results.  No timing is asserted: speed lives in bench/results."""

from __future__ import annotations

import json

import pytest

from voxtral_realtime.benchmarking.signals import speechlike
from voxtral_realtime.cli import main


def test_bench_reports_every_part(checkpoints, tiny_short, tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(checkpoints["short"].mistral_dir), "--device", "cpu", "--dtype", "f32",
                 "--audio-seconds", "2", "--step-batches", "1,3", "--streams", "2", "--stream-seconds", "1.5",
                 "--compare", "transformers", "--quant", "q8_0,q4_0", "--json", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert report["command"].startswith("voxtral bench")
    assert report["file"]["token_ids"] == tiny_short.transcribe(speechlike(2.0, seed=1)).tokens
    assert report["transformers"]["tokens_equal"] is True
    assert [s["batch"] for s in report["steps"]] == [1, 3]
    streams = report["streams"][0]
    assert streams["streams"] == 2 and streams["rows_per_decode_call"] > 1  # the two streams were batched
    assert streams["token_latency_ms_p50"] is not None
    q8, q4 = report["quantized"]
    assert (q8["qtype"], q4["qtype"]) == ("q8_0", "q4_0")
    # packed weights: about 34/128 (q8_0) and 20/128 (q4_0) of f32; on the CPU the 4-bit tied table is held twice
    # (rows to look up, and the packed int4 LM head)
    assert max(q4["decode_weight_gb"], q8["decode_weight_gb"]) < 0.5 * report["decode_weight_gb"]
    for q in (q8, q4):
        assert q["file"]["decode_steps"] == report["file"]["decode_steps"]
        assert [s["batch"] for s in q["steps"]] == [1, 3]


@pytest.mark.parametrize(("args", "message"), [
    (["--step-batches", "0"], "give positive whole numbers"),
    (["--streams", "a,b"], "not a comma-separated list"),
    (["--audio-seconds", "-3"], "give a positive number"),
    (["--step-context", "1,2"], "give one positive whole number"),
    (["--quant", "q4_0,q3"], "unknown quantization 'q3'"),
])
def test_bench_rejects_bad_numbers(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--random-weights", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_missing_audio_file_is_one_line(tmp_path, capsys, checkpoints):
    code = main(["bench", "--model", str(checkpoints["short"].mistral_dir), "--audio", str(tmp_path / "nope.wav"),
                 "--no-progress"])
    assert code == 1
    err = capsys.readouterr().err
    assert "no such file" in err and "Traceback" not in err
