"""Deterministic, resumable token loader over the shards written by data/prepare.py.

    from data.loader import TokenLoader, read_meta, val_batches
    loader = TokenLoader("data/tiny", batch_size=8, block_size=128, rank=r, world_size=w,
                         mixture={"xml": 0.4, "mdx": 0.2, "js": 0.4}, seed=0, device="cuda", fim_rate=0.5)
    x, y = loader.next_batch()               # (B, T) int64 each; y is x shifted by one token
    state = loader.state_dict()              # plain ints/strings/lists, safe for JSON
    loader.load_state_dict(state)            # exact resume, also under another world size
    loader.epochs()                          # {lang: epochs of its train stream consumed so far}

Global sequence i is a pure function of (data, seed, mixture, block_size, i):
- its language comes from a fixed, seeded pattern of PATTERN_LEN slots holding each language in
  proportion to its weight, so the k-th sequence of a language is known without counting;
- the k-th sequence of a language is a chunk of block_size+1 tokens taken from a seeded
  permutation of that language's chunks (one permutation per epoch, with a per-epoch shift so
  epochs cut the stream at different places): no chunk repeats within an epoch.
One next_batch() consumes batch_size * world_size global sequences and rank r takes the
contiguous slice [r*B, (r+1)*B). Ranks are therefore disjoint, and 2 ranks x B=2 see exactly
what 1 rank x B=4 (or 1 rank x B=2 x 2 accumulation steps) sees. With fim_rate > 0, sequence i's
documents are rearranged by data/fim.py with a generator seeded by (seed, i): still a pure function.
"""
import numpy as np
import torch

from data.fim import permute, sentinel_ids
from data.format import DataError, open_tokens, read_meta

PATTERN_LEN = 1000  # sequences per mixture cycle; weights are honoured to 1/PATTERN_LEN
FIM_SEED = 0xF1F1  # streams of FIM draws: the loader's are (seed, FIM_SEED, i), the val sets' (FIM_SEED, row)


def _mix(data_dir, meta, mixture):
    """Languages and normalised weights, sorted by name; default is proportional to train tokens."""
    if not mixture:
        mixture = {lang: meta["files"][f"train_{lang}"]["tokens"] for lang in meta["langs"]}
    unknown = sorted(set(mixture) - set(meta["langs"]))
    if unknown:
        raise DataError(f"mixture names {unknown} but {data_dir} only has {meta['langs']}: fix the mixture")
    if any(not isinstance(w, (int, float)) or w < 0 for w in mixture.values()):
        raise DataError(f"mixture weights must be numbers >= 0, got {mixture}")
    total = sum(mixture.values())
    if total <= 0:
        raise DataError(f"mixture weights sum to 0: {mixture}")
    return sorted((lang, w / total) for lang, w in mixture.items() if w > 0)


def _pattern(weights, seed):
    """PATTERN_LEN language slots, each language getting round(w * PATTERN_LEN) (at least 1), shuffled."""
    counts = [max(1, int(w * PATTERN_LEN)) for _, w in weights]
    by_remainder = sorted(range(len(weights)), key=lambda j: -(weights[j][1] * PATTERN_LEN % 1))
    j = 0
    while sum(counts) < PATTERN_LEN:  # largest remainder first
        counts[by_remainder[j % len(weights)]] += 1
        j += 1
    while sum(counts) > PATTERN_LEN:  # only when many tiny weights were raised to 1
        counts[int(np.argmax(counts))] -= 1
    slots = np.repeat(np.arange(len(weights)), counts)
    np.random.default_rng([seed, 0x5EED]).shuffle(slots)
    # rank of each slot among the slots of its language: the k-th occurrence in a cycle
    rank = np.zeros(PATTERN_LEN, dtype=np.int64)
    seen = [0] * len(weights)
    for i, lang in enumerate(slots):
        rank[i], seen[lang] = seen[lang], seen[lang] + 1
    return slots, rank, np.array(counts, dtype=np.int64)


class TokenLoader:
    def __init__(self, data_dir, batch_size, block_size, rank=0, world_size=1, mixture=None, seed=0, device="cpu",
                 fim_rate=0.0, fim_spm_rate=0.5):
        self.data_dir, self.batch_size, self.block_size = str(data_dir), int(batch_size), int(block_size)
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.device = torch.device(device)
        if not 0 <= self.rank < self.world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        self.meta = read_meta(data_dir)
        self.fim = [float(fim_rate), float(fim_spm_rate)]
        self.fim_ids = sentinel_ids(self.meta, data_dir) if fim_rate > 0 else None
        self.weights = _mix(data_dir, self.meta, mixture)
        self.data = {}
        for lang, _ in self.weights:
            tokens = open_tokens(data_dir, self.meta, "train", lang)
            if len(tokens) < 2 * self.block_size + 1:
                raise DataError(f"train_{lang}.bin has {len(tokens)} tokens, fewer than 2*block_size+1="
                                f"{2 * self.block_size + 1}: add data, drop {lang!r} from the mixture "
                                "or lower block_size")
            self.data[lang] = tokens
        self.slots, self.slot_rank, self.per_cycle = _pattern(self.weights, self.seed)
        self.perms = {}  # (lang, epoch) -> chunk permutation; only the current epochs are kept
        self.index = 0  # next global sequence
        self.pin = self.device.type == "cuda"

    def _chunks(self, lang):
        return (len(self.data[lang]) - self.block_size) // self.block_size

    def _offset(self, lang_i, k):
        """Token offset of the k-th sequence of language lang_i."""
        lang = self.weights[lang_i][0]
        n = self._chunks(lang)
        epoch, j = divmod(k, n)
        key = (lang, epoch)
        if key not in self.perms:
            for old in [o for o in self.perms if o[0] == lang and o[1] < epoch - 1]:
                del self.perms[old]
            # seeded by the language's name, so its order does not depend on the other languages
            rng = np.random.default_rng([self.seed, int.from_bytes(lang.encode(), "little"), epoch, self.block_size])
            shift = int(rng.integers(0, self.block_size)) if epoch else 0
            self.perms[key] = (rng.permutation(n), shift)
        perm, shift = self.perms[key]
        return shift + int(perm[j]) * self.block_size

    def sequence(self, i):
        """Language and block_size+1 tokens of global sequence i."""
        cycle, slot = divmod(i, PATTERN_LEN)
        lang_i = int(self.slots[slot])
        k = cycle * int(self.per_cycle[lang_i]) + int(self.slot_rank[slot])
        off = self._offset(lang_i, k)
        seq = self.data[self.weights[lang_i][0]][off:off + self.block_size + 1]
        if self.fim_ids:
            rng = np.random.default_rng([self.seed, FIM_SEED, i])
            seq = permute(np.asarray(seq), self.fim_ids, self.meta["eos_id"], rng, *self.fim)
        return self.weights[lang_i][0], seq

    def epochs(self):
        """{lang: epochs of its train stream consumed by the global sequences before self.index}."""
        cycles, slot = divmod(self.index, PATTERN_LEN)
        seen = cycles * self.per_cycle + np.bincount(self.slots[:slot], minlength=len(self.weights))
        return {lang: int(seen[j]) / self._chunks(lang) for j, (lang, _) in enumerate(self.weights)}

    def next_batch(self):
        start = self.index + self.rank * self.batch_size
        buf = np.empty((self.batch_size, self.block_size + 1), dtype=np.int64)
        for b in range(self.batch_size):
            buf[b] = self.sequence(start + b)[1]
        self.index += self.batch_size * self.world_size
        x, y = torch.from_numpy(buf[:, :-1].copy()), torch.from_numpy(buf[:, 1:].copy())
        if self.pin:  # page-locked host memory lets the copy overlap with compute
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=self.pin), y.to(self.device, non_blocking=self.pin)

    def state_dict(self):
        return {"index": self.index, "seed": self.seed, "block_size": self.block_size,
                "batch_size": self.batch_size, "world_size": self.world_size,
                "mixture": [[lang, w] for lang, w in self.weights], "fim": self.fim,
                "tokens": [[lang, len(self.data[lang])] for lang, _ in self.weights]}

    def load_state_dict(self, state):
        if not isinstance(state, dict) or not isinstance(state.get("index"), int) or state["index"] < 0:
            raise DataError(f"loader state has no valid 'index' (got {str(state)[:80]}): "
                            "the checkpoint's train_state is damaged")
        changed = [f"{key} {state[key]} -> {getattr(self, key)}"
                   for key in ("world_size", "batch_size", "seed", "block_size")
                   if key in state and state[key] != getattr(self, key)]
        if "mixture" in state and [list(x) for x in state["mixture"]] != [[lang, w] for lang, w in self.weights]:
            changed.append("mixture")
        if state.get("fim", [0.0, 0.5]) != self.fim:  # checkpoints from before FIM trained without it
            changed.append(f"fim_rate, fim_spm_rate {state.get('fim', [0.0, 0.5])} -> {self.fim}")
        if "tokens" in state and ([list(x) for x in state["tokens"]]
                                  != [[lang, len(self.data[lang])] for lang, _ in self.weights]):
            changed.append("data")
        self.index = int(state["index"])
        if changed and self.rank == 0:
            print(f"loader: resuming at global sequence {self.index} with {', '.join(changed)}")


def val_batches(data_dir, lang, batch_size, block_size, n_batches, device="cpu", fim_spm_rate=None):
    """n_batches fixed (x, y) batches from val_{lang}.bin, evenly spread over the stream (overlapping
    when it is short). [] with a warning when the language has less than one sequence of val data.
    With fim_spm_rate, every document of them rearranged for FIM (data/fim.py), by a fixed seed."""
    meta = read_meta(data_dir)
    tokens = open_tokens(data_dir, meta, "val", lang)
    if len(tokens) < block_size + 1:
        print(f"warning: val_{lang}.bin has {len(tokens)} tokens, fewer than block_size+1={block_size + 1}: "
              f"no val batches for {lang} (raise --val-fraction or add data)")
        return []
    n = batch_size * n_batches
    offsets = np.linspace(0, len(tokens) - block_size - 1, n).astype(np.int64)
    buf = np.stack([np.asarray(tokens[o:o + block_size + 1], dtype=np.int64) for o in offsets])
    if fim_spm_rate is not None:
        ids = sentinel_ids(meta, data_dir)
        buf = np.stack([permute(row, ids, meta["eos_id"], np.random.default_rng([FIM_SEED, r]), 1.0, fim_spm_rate)
                        for r, row in enumerate(buf)])
    x, y = torch.from_numpy(buf[:, :-1].copy()).to(device), torch.from_numpy(buf[:, 1:].copy()).to(device)
    return [(x[i * batch_size:(i + 1) * batch_size], y[i * batch_size:(i + 1) * batch_size]) for i in range(n_batches)]
