/* Streaming video instance segmentation from the raw graphs' outputs, in plain JavaScript: a port
 * of mobileinst/infer/video.py (`VideoPredictor.step`, after the network) on top of tracker.js.
 *
 * Kernel reuse: every `reuse`-th frame is a KEY frame and runs the raw graph (track.onnx: logits,
 * objectness, kernels, mask_features); the frames between run the features graph
 * (track-features.onnx: mask_features) and dot its mask features with the last key frame's
 * kernels. On a key frame the kernels are associated with the previous key frame's (slot order),
 * class probabilities sqrt(sigmoid(logits) * sigmoid(objectness)) and every slot's maskness (the
 * mean mask probability over its pixels > mask_threshold, at stride 4) update the tracks; every
 * frame draws the alive tracks' masks: mask logits kernels . M (stride 8), bilinear x mask_upsample,
 * sigmoid, bilinear to the padded input, cropped to the image, bilinear to the frame's size,
 * > mask_threshold (mobileinst/models/postprocess.py: kernel_mask_logits, maskness, upsample_masks;
 * PyTorch's bilinear with align_corners=False).
 *
 * Browser: `window.mobileinstVideo` (after tracker.js); Node: `require('./video.js')`.
 */
'use strict';
(function (root, factory) {
  if (typeof module === 'object' && module.exports) module.exports = factory(require('./tracker.js'));
  else root.mobileinstVideo = factory(root.mobileinstTracker);
})(typeof self !== 'undefined' ? self : this, function (T) {
  const f32 = Math.fround;
  const sigmoid = (x) => 1 / (1 + Math.exp(-x));

  /** logits (n, c), objectness (n,) -> every class's score (n, c): sqrt(sigmoid(l) * sigmoid(o)). */
  function classScores(logits, objectness, n, c) {
    const out = new Float32Array(n * c);
    for (let i = 0; i < n; i++) {
      const po = f32(sigmoid(objectness[i]));
      for (let k = 0; k < c; k++) out[i * c + k] = Math.sqrt(f32(f32(sigmoid(logits[i * c + k])) * po));
    }
    return out;
  }

  /** PyTorch's bilinear taps along one axis (align_corners=False; postprocess.py `_linear_taps`):
   * output o reads i0[o], i1[o] with weights 1 - l1[o], l1[o]. */
  function linearTaps(inSize, outSize) {
    const scale = f32(inSize / outSize);
    const i0 = new Int32Array(outSize), i1 = new Int32Array(outSize), l1 = new Float32Array(outSize);
    for (let o = 0; o < outSize; o++) {
      const src = Math.max(f32(f32(f32(o + 0.5) * scale) - 0.5), 0);
      i0[o] = Math.min(Math.floor(src), inSize - 1);
      i1[o] = Math.min(i0[o] + 1, inSize - 1);
      l1[o] = Math.min(Math.max(f32(src - i0[o]), 0), 1);
    }
    return {i0, i1, l1};
  }

  /** (k, h, w) -> (k, h * up, w * up): F.interpolate(scale_factor=up, bilinear). */
  function upsample(x, k, h, w, up) {
    const H = h * up, W = w * up, ty = linearTaps(h, H), tx = linearTaps(w, W);
    const out = new Float32Array(k * H * W);
    for (let q = 0; q < k; q++) {
      const src = q * h * w, dst = q * H * W;
      for (let y = 0; y < H; y++) {
        const r0 = src + ty.i0[y] * w, r1 = src + ty.i1[y] * w, b = ty.l1[y];
        for (let xo = 0; xo < W; xo++) {
          const a = tx.l1[xo], c0 = tx.i0[xo], c1 = tx.i1[xo];
          const top = (1 - a) * x[r0 + c0] + a * x[r0 + c1], bottom = (1 - a) * x[r1 + c0] + a * x[r1 + c1];
          out[dst + y * W + xo] = (1 - b) * top + b * bottom;
        }
      }
    }
    return out;
  }

  /** Mask probabilities of the kernel rows `rows` of (n, e) `kernels` over M (e, h, w): sigmoid of
   * bilinear_x`up`(kernels . M) -> (rows.length, h * up, w * up). */
  function maskProbs(kernels, rows, M, e, h, w, up) {
    const hw = h * w, logits = new Float32Array(rows.length * hw);
    rows.forEach((row, q) => {
      const acc = new Float64Array(hw);
      for (let k = 0; k < e; k++) {
        const wk = kernels[row * e + k], mk = k * hw;
        for (let p = 0; p < hw; p++) acc[p] += wk * M[mk + p];
      }
      logits.set(acc, q * hw);
    });
    const out = up === 1 ? logits : upsample(logits, rows.length, h, w, up);
    for (let i = 0; i < out.length; i++) out[i] = sigmoid(out[i]);
    return out;
  }

  /** (k, hw) probabilities -> (k,) mean probability over the pixels > threshold. */
  function maskness(prob, k, hw, threshold) {
    const out = new Float32Array(k);
    for (let q = 0; q < k; q++) {
      let sum = 0, count = 0;
      for (let p = q * hw; p < (q + 1) * hw; p++) {
        if (prob[p] > threshold) { sum += prob[p]; count++; }
      }
      out[q] = f32(sum) / f32(count + 1e-6);
    }
    return out;
  }

  /** One axis of upsample_masks (stride 4 `n4` -> `padded`, crop to `size`, -> `orig`) as 4 taps
   * per output pixel: idx (orig * 4) into the stride-4 axis and their weights. */
  function composedTaps(n4, padded, size, orig) {
    const a = linearTaps(n4, padded);
    const b = size === orig ? null : linearTaps(size, orig);  // the same size: no second resize
    const idx = new Int32Array(orig * 4), wt = new Float64Array(orig * 4);
    for (let o = 0; o < orig; o++) {
      const b0 = b ? b.i0[o] : o, b1 = b ? b.i1[o] : o, lb = b ? b.l1[o] : 0;
      idx.set([a.i0[b0], a.i1[b0], a.i0[b1], a.i1[b1]], o * 4);
      wt.set([(1 - lb) * (1 - a.l1[b0]), (1 - lb) * a.l1[b0], lb * (1 - a.l1[b1]), lb * a.l1[b1]], o * 4);
    }
    return {idx, wt};
  }

  /** Stride-4 probabilities (k, h4, w4) -> per instance {mask (H0 * W0) 0/1, area, box [x0, y0,
   * x1, y1)} at the original size: upsample_masks > threshold. */
  function frameMasks(prob, k, h4, w4, geom, threshold) {
    const [H, W] = geom.padded, [h, w] = geom.size, [H0, W0] = geom.orig;
    const ty = composedTaps(h4, H, h, H0), tx = composedTaps(w4, W, w, W0);
    const rows = new Float64Array(h4 * W0), out = [];
    for (let q = 0; q < k; q++) {
      const p = prob.subarray(q * h4 * w4, (q + 1) * h4 * w4);
      for (let y = 0; y < h4; y++) {
        for (let x = 0; x < W0; x++) {
          let v = 0;
          for (let t = x * 4; t < x * 4 + 4; t++) v += tx.wt[t] * p[y * w4 + tx.idx[t]];
          rows[y * W0 + x] = v;
        }
      }
      const mask = new Uint8Array(H0 * W0);
      let area = 0, x0 = W0, y0 = H0, x1 = -1, y1 = -1;
      for (let y = 0; y < H0; y++) {
        for (let x = 0; x < W0; x++) {
          let v = 0;
          for (let t = y * 4; t < y * 4 + 4; t++) v += ty.wt[t] * rows[ty.idx[t] * W0 + x];
          if (v > threshold) {
            mask[y * W0 + x] = 1;
            area++;
            x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y);
          }
        }
      }
      out.push({mask, area, box: area ? [x0, y0, x1 + 1, y1 + 1] : [0, 0, 0, 0]});
    }
    return out;
  }

  /** A 0/1 mask -> its row-major run lengths, starting with a run of 0s (what the tests read). */
  function rle(mask) {
    const counts = [];
    let last = 0, run = 0;
    for (let i = 0; i < mask.length; i++) {
      if (mask[i] !== last) { counts.push(run); run = 0; last = mask[i]; }
      run++;
    }
    counts.push(run);
    return counts;
  }

  /** One video's streaming state: `VideoPredictor` minus the network and pre-processing. */
  class VideoStream {
    /** opts: {maskUpsample = 2, maskThreshold = 0.45, reuse = 1, startScore, keepScore, patience}. */
    constructor(opts = {}) {
      const {maskUpsample = 2, maskThreshold = 0.45, reuse = 1, ...cfg} = opts;
      Object.assign(this, {maskUpsample, maskThreshold, reuse});
      this.tracker = new T.Tracker(cfg);
      this.reset();
    }

    /** Forget the video: the next frame is frame 0 and a key frame. */
    reset() {
      this.tracker.reset();
      this.frame = 0;
      this.lastKey = -1;
      this.kernels = null;  // (n, e) the last key frame's kernels, slot order
      this.classProbs = null;  // (n, c) its class probabilities, slot order
    }

    isKey() {
      return this.kernels === null || this.frame - this.lastKey >= this.reuse;
    }

    /** One frame's graph outputs ({data, dims} each, batch 1): a key frame's logits, objectness,
     * kernels, maskFeatures, or another frame's maskFeatures; geom {padded: [H, W], size: [h, w]
     * the image inside the padding, orig: [H0, W0]} -> {index, key, tracks: alive tracks in slot
     * order, each {id, slot, label, score, mask, area, box}}. */
    step(out, geom) {
      const key = this.isKey();
      if (key) this.keyFrame(out);
      const [, e, h, w] = out.maskFeatures.dims, up = this.maskUpsample;
      const hw4 = h * up * w * up;
      const slots = key ? Array.from({length: this.n}, (_, i) => i) : this.aliveSlots();
      const prob = maskProbs(this.kernels, slots, out.maskFeatures.data, e, h, w, up);
      if (key) {
        this.tracker.update(this.frame, this.classProbs, maskness(prob, this.n, hw4, this.maskThreshold),
                            this.n, this.c);
      }
      const alive = this.tracker.alive().sort((a, b) => a.slot - b.slot);
      const picked = new Float32Array(alive.length * hw4);
      alive.forEach((t, i) => {
        const row = key ? t.slot : i;  // prob has every slot on a key frame, else the alive ones
        picked.set(prob.subarray(row * hw4, (row + 1) * hw4), i * hw4);
      });
      const masks = frameMasks(picked, alive.length, h * up, w * up, geom, this.maskThreshold);
      const tracks = alive.map((t, i) => ({id: t.id, slot: t.slot, label: t.label, score: t.score, ...masks[i]}));
      return {index: this.frame++, key, tracks};
    }

    keyFrame(out) {
      const [, n, c] = out.logits.dims, e = out.kernels.dims[2];
      const perm = this.tracker.associate(out.kernels.data, n, e);
      const probs = classScores(out.logits.data, out.objectness.data, n, c);
      this.kernels = T.permuteRows(out.kernels.data, perm, e, Float32Array);
      this.classProbs = T.permuteRows(probs, perm, c, Float32Array);
      Object.assign(this, {n, c, lastKey: this.frame});
    }

    aliveSlots() {
      return this.tracker.alive().map((t) => t.slot).sort((a, b) => a - b);
    }
  }

  return {classScores, linearTaps, upsample, maskProbs, maskness, frameMasks, rle, VideoStream};
});
