/* Kernel association and track bookkeeping in plain JavaScript: a port of mobileinst's NumPy
 * reference (mobileinst/track/association_np.py, the specification) and of its track state
 * (mobileinst/infer/tracker.py, `Tracker`), so that a page keeps the ids `mobileinst track` gives.
 *
 * Association (MinVIS `match_from_embds`, NVlabs/MinVIS): the N kernels of the current key frame
 * (query order) and of the previous one (slot order) are L2-normalised, cost = 1 - cosine
 * similarity (N x N), and the linear assignment of least total cost permutes the current queries
 * into slot order; no threshold: every slot always gets a query. The assignment is a port of
 * SciPy's `linear_sum_assignment` (scipy/optimize/rectangular_lsap/rectangular_lsap.cpp: Crouse's
 * shortest augmenting path, BSD-3-Clause, author PM Larsen), step for step, so that equal costs
 * are broken as SciPy breaks them.
 *
 * Tracks: a free slot whose score (max class probability x maskness) reaches startScore starts a
 * track; it stays alive while its score is >= keepScore (default startScore / 2), is lost below
 * it and ends after more than `patience` frames lost; ids 1, 2, 3, ... in order of start, never
 * reused. A track's class is the argmax of its class probabilities summed over its alive key
 * frames, its score the mean per-frame score of that class.
 *
 * Arithmetic follows the Python path's float32 where it decides something: kernels, costs and
 * per-slot scores are rounded to float32 (Math.fround), thresholds compared as NumPy compares a
 * float32 with a Python float (NEP 50: the float becomes float32), sums kept in float64.
 *
 * Browser: `window.mobileinstTracker`; Node: `require('./tracker.js')`.
 */
'use strict';
(function (root, factory) {
  if (typeof module === 'object' && module.exports) module.exports = factory();
  else root.mobileinstTracker = factory();
})(typeof self !== 'undefined' ? self : this, function () {
  const f32 = Math.fround;
  const EPS = 1e-12;  // torch.nn.functional.normalize's default

  // -- association (association_np.py) ---------------------------------------------------------
  /** (n, e) row-major -> a Float32Array, every row divided by max(||row||_2, 1e-12). */
  function l2Normalize(kernels, n, e) {
    const out = new Float32Array(n * e);
    for (let i = 0; i < n; i++) {
      let ss = 0;
      for (let k = 0; k < e; k++) ss = f32(ss + f32(kernels[i * e + k] * kernels[i * e + k]));
      const norm = Math.max(f32(Math.sqrt(ss)), f32(EPS));
      for (let k = 0; k < e; k++) out[i * e + k] = kernels[i * e + k] / norm;
    }
    return out;
  }

  /** prev (n, e), cur (m, e) -> cost (m, n) = 1 - cosine similarity, float32 values. */
  function associationCost(prev, cur, n, m, e) {
    const p = l2Normalize(prev, n, e), c = l2Normalize(cur, m, e);
    const cost = new Float64Array(m * n);
    for (let i = 0; i < m; i++) {
      for (let j = 0; j < n; j++) {
        let dot = 0;
        for (let k = 0; k < e; k++) dot = f32(dot + f32(c[i * e + k] * p[j * e + k]));
        cost[i * n + j] = f32(1 - dot);
      }
    }
    return cost;
  }

  /** SciPy's linear_sum_assignment of an (nr, nc) cost, nr <= nc -> col4row (nr,): row i takes
   * column col4row[i]. rectangular_lsap.cpp `solve`, including its tie-breaking. */
  function linearSumAssignment(input, nr, nc) {
    if (nr > nc) throw new Error(`linearSumAssignment: ${nr} rows > ${nc} columns`);
    let lo = Infinity;
    for (let i = 0; i < nr * nc; i++) {
      if (Number.isNaN(input[i]) || input[i] === -Infinity) throw new Error('linearSumAssignment: invalid cost');
      lo = Math.min(lo, input[i]);
    }
    const cost = new Float64Array(nr * nc);
    for (let i = 0; i < nr * nc; i++) cost[i] = input[i] - lo;  // non-negative
    const s = {nc, cost, u: new Float64Array(nr), v: new Float64Array(nc),
               shortest: new Float64Array(nc), path: new Int32Array(nc).fill(-1),
               col4row: new Int32Array(nr).fill(-1), row4col: new Int32Array(nc).fill(-1),
               SR: new Uint8Array(nr), SC: new Uint8Array(nc)};
    for (let cur = 0; cur < nr; cur++) {
      const {sink, minVal} = augmentingPath(s, cur);
      if (sink < 0) throw new Error('linearSumAssignment: infeasible cost matrix');
      updateDuals(s, cur, minVal, nr);
      augment(s, cur, sink);
    }
    return s.col4row;
  }

  // rectangular_lsap.cpp `augmenting_path`: the shortest augmenting path from row i
  function augmentingPath(s, i) {
    const {nc, cost, u, v, shortest, path, row4col, SR, SC} = s;
    let minVal = 0, remaining = nc;
    const rest = new Int32Array(nc);
    for (let it = 0; it < nc; it++) rest[it] = nc - it - 1;  // reversed: identity on a constant cost
    SR.fill(0);
    SC.fill(0);
    shortest.fill(Infinity);
    let sink = -1;
    while (sink === -1) {
      let index = -1, lowest = Infinity;
      SR[i] = 1;
      for (let it = 0; it < remaining; it++) {
        const j = rest[it];
        const r = minVal + cost[i * nc + j] - u[i] - v[j];
        if (r < shortest[j]) {
          path[j] = i;
          shortest[j] = r;
        }
        if (shortest[j] < lowest || (shortest[j] === lowest && row4col[j] === -1)) {
          lowest = shortest[j];
          index = it;
        }
      }
      minVal = lowest;
      if (minVal === Infinity) return {sink: -1, minVal};
      const j = rest[index];
      if (row4col[j] === -1) sink = j;
      else i = row4col[j];
      SC[j] = 1;
      rest[index] = rest[--remaining];
    }
    return {sink, minVal};
  }

  function updateDuals(s, cur, minVal, nr) {
    const {u, v, shortest, col4row, SR, SC, nc} = s;
    u[cur] += minVal;
    for (let i = 0; i < nr; i++) {
      if (SR[i] && i !== cur) u[i] += minVal - shortest[col4row[i]];
    }
    for (let j = 0; j < nc; j++) {
      if (SC[j]) v[j] -= minVal - shortest[j];
    }
  }

  function augment(s, cur, sink) {
    let j = sink;
    for (;;) {
      const i = s.path[j];
      s.row4col[j] = i;
      const prev = s.col4row[i];
      s.col4row[i] = j;
      j = prev;
      if (i === cur) break;
    }
  }

  /** match_kernels_np: prev (n, e) in slot order, cur (n, e) in query order -> perm (n,) with
   * cur[perm[s]] continuing slot s. */
  function matchKernels(prev, cur, n, e) {
    const col4row = linearSumAssignment(associationCost(prev, cur, n, n, e), n, n);  // cur i -> prev j
    const perm = new Int32Array(n);
    for (let i = 0; i < n; i++) perm[col4row[i]] = i;
    return perm;
  }

  // -- tracks (tracker.py) ----------------------------------------------------------------------
  class Track {
    constructor(id, slot, frame, numClasses) {
      Object.assign(this, {id, slot, startFrame: frame, lastSeen: frame, n: 0, alive: true});
      this.classSum = new Float64Array(numClasses);  // class probabilities over alive key frames
      this.scoreSum = new Float64Array(numClasses);  // per-frame scores (prob x maskness), likewise
    }

    get label() {  // numpy argmax: the first maximum
      let best = 0;
      for (let c = 1; c < this.classSum.length; c++) if (this.classSum[c] > this.classSum[best]) best = c;
      return best;
    }

    get score() {
      return this.scoreSum[this.label] / Math.max(this.n, 1);
    }
  }

  class Tracker {
    /** cfg: {startScore = 0.3, keepScore = null (startScore / 2), patience = 10}. */
    constructor(cfg = {}) {
      this.cfg = {startScore: 0.3, keepScore: null, patience: 10, ...cfg};
      this.reset();
    }

    get keep() {
      return this.cfg.keepScore === null ? this.cfg.startScore / 2 : this.cfg.keepScore;
    }

    reset() {
      this.prevKernels = null;  // (n, e) Float32Array: the previous key frame's kernels, slot order
      this.prevShape = null;
      this.tracks = new Map();  // slot -> its current track, in order of start (a Python dict)
      this.nextId = 1;
      this.ended = [];  // the last update's ended tracks
    }

    /** Key-frame kernels (n, e) in query order -> perm (n,) that puts them in slot order. */
    associate(kernels, n, e) {
      const same = this.prevShape && this.prevShape[0] === n && this.prevShape[1] === e;
      const perm = same ? matchKernels(this.prevKernels, kernels, n, e) : Int32Array.from({length: n}, (_, i) => i);
      this.prevKernels = permuteRows(kernels, perm, e, Float32Array);
      this.prevShape = [n, e];
      return perm;
    }

    /** One key frame in slot order: classProbs (n, c), maskness (n,). Starts, continues, loses and
     * ends tracks; returns the alive tracks. */
    update(frame, classProbs, maskness, n, c) {
      const start = f32(this.cfg.startScore), keep = f32(this.keep);
      this.ended = [];
      for (let slot = 0; slot < n; slot++) {
        const score = f32(rowMax(classProbs, slot, c) * maskness[slot]);
        let track = this.tracks.get(slot);
        if (!track) {
          if (!(score >= start)) continue;
          track = new Track(this.nextId++, slot, frame, c);
          this.tracks.set(slot, track);
        }
        if (score >= keep) {
          Object.assign(track, {alive: true, lastSeen: frame, n: track.n + 1});
          for (let k = 0; k < c; k++) {
            track.classSum[k] += classProbs[slot * c + k];
            track.scoreSum[k] += f32(classProbs[slot * c + k] * maskness[slot]);
          }
        } else {
          track.alive = false;
          if (frame - track.lastSeen > this.cfg.patience) {
            this.ended.push(track);
            this.tracks.delete(slot);
          }
        }
      }
      return this.alive();
    }

    alive() {
      return [...this.tracks.values()].filter((t) => t.alive);
    }
  }

  function rowMax(a, row, c) {
    let m = -Infinity;
    for (let k = 0; k < c; k++) m = Math.max(m, a[row * c + k]);
    return m;
  }

  /** rows of (n, e) `a` in the order `perm` -> a new array of type T. */
  function permuteRows(a, perm, e, T) {
    const out = new T(perm.length * e);
    for (let s = 0; s < perm.length; s++) out.set(a.subarray(perm[s] * e, perm[s] * e + e), s * e);
    return out;
  }

  return {l2Normalize, associationCost, linearSumAssignment, matchKernels, permuteRows, Track, Tracker};
});
