"""The package's synthetic audio, under the name the tests import."""

from voxtral_realtime.benchmarking.signals import SAMPLE_RATE, quantize16, speechlike  # noqa: F401
