"""``voxtral listen`` with a fake microphone: a test double replaces the sounddevice module, nothing else."""

from __future__ import annotations

import _thread
import sys
import threading
import types

import numpy as np

from voxtral_realtime.benchmarking.signals import speechlike
from voxtral_realtime.cli import main


class FakeSoundDevice(types.ModuleType):
    """Plays ``audio`` into the callback in 80 ms blocks, then presses Ctrl-C."""

    def __init__(self, audio: np.ndarray | None, rate: int = 16000) -> None:
        super().__init__("sounddevice")
        self.audio, self.rate = audio, rate
        fake = self

        class InputStream:
            def __init__(self, *, samplerate, channels, dtype, device, callback, blocksize):
                assert (samplerate, channels, dtype) == (fake.rate, 1, "float32")
                self.callback, self.blocksize = callback, blocksize

            def _play(self):
                for start in range(0, len(fake.audio), self.blocksize):
                    block = fake.audio[start:start + self.blocksize, None].astype(np.float32)
                    self.callback(block, len(block), None, None)
                _thread.interrupt_main()  # the user presses Ctrl-C

            def __enter__(self):
                self.thread = threading.Thread(target=self._play, daemon=True)
                self.thread.start()
                return self

            def __exit__(self, *exc):
                self.thread.join()

        self.InputStream = InputStream

    def query_devices(self, device=None, kind=None):
        if self.audio is None:
            raise ValueError("No input device matching ''")
        return {"name": "fake microphone", "default_samplerate": float(self.rate), "max_input_channels": 1}


def test_listen_prints_live_text_and_the_final_transcript(tiny_short, checkpoints, monkeypatch, capsys):
    audio = speechlike(3.0, seed=50)
    monkeypatch.setitem(sys.modules, "sounddevice", FakeSoundDevice(audio))
    assert main(["listen", "--model", str(checkpoints["short"].mistral_dir), "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    expected = tiny_short.transcribe(audio).text
    # live captions as they were decided, then the final transcript: both the whole-file text
    assert out == expected + "\n" + expected.strip() + "\n"
    assert "fake microphone" in err and "final text" in err


def test_listen_resamples_a_48k_microphone(checkpoints, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sounddevice", FakeSoundDevice(np.zeros(48000, np.float32), rate=48000))
    assert main(["listen", "--model", str(checkpoints["short"].mistral_dir), "--device", "cpu"]) == 0
    assert "final text (1.0 s)" in capsys.readouterr().err


def test_listen_without_an_input_device_says_so(checkpoints, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sounddevice", FakeSoundDevice(None))
    assert main(["listen", "--model", str(checkpoints["short"].mistral_dir)]) == 1
    err = capsys.readouterr().err
    assert "no audio input device" in err and "Traceback" not in err


def test_listen_without_portaudio_says_how_to_install_it(monkeypatch, capsys):
    class Missing(types.ModuleType):
        def __getattr__(self, name):
            raise AssertionError

    def broken_import(name, *args, **kwargs):
        if name == "sounddevice":
            raise OSError("PortAudio library not found")
        return real_import(name, *args, **kwargs)

    import builtins

    real_import = builtins.__import__
    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    monkeypatch.setattr(builtins, "__import__", broken_import)
    assert main(["listen"]) == 1
    assert "PortAudio" in capsys.readouterr().err


def test_listen_says_when_it_falls_behind_the_microphone(tiny_short, checkpoints, monkeypatch, capsys):
    """3 s of audio waiting at once (as on a device slower than real time): one warning, and no audio lost."""
    import queue

    from voxtral_realtime.cli import listen

    taken = threading.Event()

    class RecordingQueue(queue.Queue):
        def get(self, *args, **kwargs):
            item = super().get(*args, **kwargs)
            taken.set()
            return item

    class BurstSoundDevice(FakeSoundDevice):
        """Delivers all its audio before the first block is taken; Ctrl-C once the model has taken one."""

        def __init__(self, audio: np.ndarray) -> None:
            super().__init__(audio)
            fake = self

            class InputStream(self.InputStream):
                def __enter__(self):
                    for start in range(0, len(fake.audio), self.blocksize):
                        block = fake.audio[start:start + self.blocksize, None].astype(np.float32)
                        self.callback(block, len(block), None, None)
                    self.thread = threading.Thread(target=lambda: taken.wait(60) and _thread.interrupt_main(),
                                                   daemon=True)
                    self.thread.start()
                    return self

            self.InputStream = InputStream

    audio = speechlike(3.0, seed=51)
    monkeypatch.setattr(listen, "queue", types.SimpleNamespace(Queue=RecordingQueue, Empty=queue.Empty))
    monkeypatch.setitem(sys.modules, "sounddevice", BurstSoundDevice(audio))
    assert main(["listen", "--model", str(checkpoints["short"].mistral_dir), "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    waiting = (-(-len(audio) // 1280) - 1) * 0.08  # every 80 ms block but the one taken
    assert err.count("not keeping up") == 1 and f"{waiting:.1f} s of audio is waiting" in err
    assert out.endswith(tiny_short.transcribe(audio).text.strip() + "\n")
