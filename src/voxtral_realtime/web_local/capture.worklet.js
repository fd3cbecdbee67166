// Microphone capture in the audio thread: mixes to mono, resamples from the context's rate to 16 kHz and posts
// blocks of 80 ms (1280 samples) to the page.  Resampling: a windowed-sinc low-pass at 7.6 kHz (below the new
// Nyquist, so nothing folds back), evaluated at each output instant, which interpolates and filters in one pass.

const TARGET_RATE = 16000;
const BLOCK = 1280;
const HALF_TAPS = 16; // input samples on each side of an output instant (at the input rate)

class CaptureProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.ratio = sampleRate / TARGET_RATE; // input samples per output sample
    // cutoff relative to the input rate; when upsampling the input's own Nyquist is the limit
    this.cutoff = Math.min(0.5, (0.475 * TARGET_RATE) / sampleRate);
    this.base = -HALF_TAPS; // the stream starts with silence before its first sample
    this.history = new Float32Array(HALF_TAPS); // input not yet fully used, from input index `base`
    this.next = 0; // input-rate position of the next output sample
    this.out = new Float32Array(BLOCK);
    this.filled = 0;
  }

  kernel(x) {
    const sinc = x === 0 ? 2 * this.cutoff : Math.sin(2 * Math.PI * this.cutoff * x) / (Math.PI * x);
    const w = 0.5 + 0.5 * Math.cos((Math.PI * x) / (HALF_TAPS + 1)); // Hann window over the taps
    return sinc * w;
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true;
    const n = channels[0].length;
    const mono = new Float32Array(n);
    for (const ch of channels) for (let i = 0; i < n; i++) mono[i] += ch[i] / channels.length;
    const joined = new Float32Array(this.history.length + n);
    joined.set(this.history);
    joined.set(mono, this.history.length);
    const lastIndex = this.base + joined.length - 1;
    while (this.next + HALF_TAPS <= lastIndex) {
      const centre = Math.floor(this.next);
      let acc = 0;
      let norm = 0;
      for (let k = centre - HALF_TAPS + 1; k <= centre + HALF_TAPS; k++) {
        const weight = this.kernel(this.next - k);
        acc += weight * joined[k - this.base];
        norm += weight;
      }
      this.out[this.filled++] = acc / norm; // unit gain at DC whatever the fractional offset
      if (this.filled === BLOCK) {
        this.port.postMessage(this.out.slice());
        this.filled = 0;
      }
      this.next += this.ratio;
    }
    const keepFrom = Math.floor(this.next) - HALF_TAPS + 1 - this.base;
    this.history = joined.slice(Math.max(0, keepFrom));
    this.base += Math.max(0, keepFrom);
    return true;
  }
}

registerProcessor("voxtral-capture", CaptureProcessor);
