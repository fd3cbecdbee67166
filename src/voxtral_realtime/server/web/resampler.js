// Streaming sample-rate conversion for the microphone: the model wants 16 kHz, and a browser captures at the
// audio device's rate (48 kHz, 44.1 kHz...).  Firefox cannot connect a microphone to an AudioContext running at
// another rate, so the page converts the rate itself.
//
// Windowed-sinc interpolation (Blackman window), low-pass at 90 % of the output's Nyquist frequency so that
// nothing above 8 kHz folds back into the speech band.  The ratio inputRate/outputRate is reduced to p/q; each
// output sample falls on one of q fractional positions, whose filter taps are computed once.

const MAX_TABLE_PHASES = 4096;

function gcd(a, b) {
  while (b) [a, b] = [b, a % b];
  return a;
}

function blackman(x) {
  // x in [-1, 1]
  return 0.42 + 0.5 * Math.cos(Math.PI * x) + 0.08 * Math.cos(2 * Math.PI * x);
}

export class StreamingResampler {
  /**
   * @param {number} inputRate  samples per second coming in (integer)
   * @param {number} outputRate samples per second going out (integer)
   * @param {number} zeroCrossings sinc lobes on each side of the centre (quality vs cost)
   */
  constructor(inputRate, outputRate, zeroCrossings = 16) {
    if (!Number.isInteger(inputRate) || !Number.isInteger(outputRate) || inputRate <= 0 || outputRate <= 0) {
      throw new Error(`sample rates must be positive integers, got ${inputRate} and ${outputRate}`);
    }
    this.passthrough = inputRate === outputRate;
    const divisor = gcd(inputRate, outputRate);
    this.advance = inputRate / divisor; // p: input advance per output sample, in 1/q input samples
    this.phases = outputRate / divisor; // q
    this.cutoff = Math.min(1, outputRate / inputRate) * 0.9;
    this.halfWidth = Math.ceil(zeroCrossings / this.cutoff);
    this.taps = 2 * this.halfWidth;
    this.table = this.phases <= MAX_TABLE_PHASES ? this.#buildTable() : null;
    // the signal starts with silence, so the first output sample is centred on the first input sample
    this.buffer = new Float32Array(this.halfWidth - 1);
    this.position = (this.halfWidth - 1) * this.phases; // next output's time, in 1/q input samples
    this.realEnd = this.halfWidth - 1; // buffer index just past the last real input sample
  }

  /** Convert the next piece of input; returns the output samples it completes. */
  push(input) {
    if (this.passthrough) return Float32Array.from(input);
    this.#append(input);
    this.realEnd += input.length;
    return this.#produce(this.realEnd);
  }

  /** The output still held back for lack of look-ahead, at the end of the stream. */
  flush() {
    if (this.passthrough) return new Float32Array(0);
    this.#append(new Float32Array(this.halfWidth + 1));
    return this.#produce(this.realEnd);
  }

  #append(input) {
    const joined = new Float32Array(this.buffer.length + input.length);
    joined.set(this.buffer);
    joined.set(input, this.buffer.length);
    this.buffer = joined;
  }

  #produce(end) {
    const { advance, phases, halfWidth, taps, buffer } = this;
    const out = [];
    for (;;) {
      const centre = Math.floor(this.position / phases);
      if (centre >= end || centre + halfWidth >= buffer.length) break;
      const phase = this.position - centre * phases;
      const weights = this.table ? this.table[phase] : this.#weights(phase);
      const first = centre - halfWidth + 1;
      let sum = 0;
      for (let j = 0; j < taps; j++) sum += weights[j] * buffer[first + j];
      out.push(sum);
      this.position += advance;
    }
    // keep only what the next output still needs
    const keepFrom = Math.max(0, Math.floor(this.position / phases) - halfWidth + 1);
    if (keepFrom > 0) {
      this.buffer = buffer.slice(Math.min(keepFrom, buffer.length));
      this.position -= keepFrom * phases;
      this.realEnd -= keepFrom;
    }
    return Float32Array.from(out);
  }

  #buildTable() {
    const table = [];
    for (let phase = 0; phase < this.phases; phase++) table.push(this.#weights(phase));
    return table;
  }

  #weights(phase) {
    const { halfWidth, taps, cutoff } = this;
    const weights = new Float32Array(taps);
    const fraction = phase / this.phases;
    let total = 0;
    for (let j = 0; j < taps; j++) {
      const x = fraction + halfWidth - 1 - j; // distance from the output's time to tap j, in input samples
      const y = cutoff * x;
      const sinc = y === 0 ? 1 : Math.sin(Math.PI * y) / (Math.PI * y);
      const w = Math.abs(x) >= halfWidth ? 0 : cutoff * sinc * blackman(x / halfWidth);
      weights[j] = w;
      total += w;
    }
    // unit gain at DC for every phase, so a constant stays constant
    for (let j = 0; j < taps; j++) weights[j] /= total;
    return weights;
  }
}
