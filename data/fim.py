"""Fill-in-the-middle (Bavarian et al. 2022, "Efficient Training of Language Models to Fill in the Middle"), per
document, on the token sequences the loader cuts, as StarCoder, SantaCoder and Code Llama train:

    ids = sentinel_ids(meta, data_dir)                               # the sentinels' token ids, from meta.json
    seq = permute(seq, ids, eos, np.random.default_rng([seed, i]), rate=0.5, spm_rate=0.5)   # same length

A sequence (block_size + 1 tokens of a packed stream) is split at EOS into documents; its first and last may be
parts of documents that straddle it. Each, with probability `rate`, is cut at two uniform token positions into
prefix, middle and suffix, and written

    PSM  <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle
    SPM  <fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle    (probability spm_rate: the paper's SPM
                                                                          variant, StarCoder's and Code Llama's)

and then its EOS, so the model learns to stop after the middle. The 3 tokens a document gains are cut from the
end of the sequence, which keeps its length. The draws come from `rng`, which the loader seeds with (seed,
sequence index): a sequence is rearranged the same way on every rank and after every resume.

Cuts fall between tokens, not characters: the middle a model is asked for at inference starts and ends where a
tokenizer splits the prefix and the suffix, which is nearly always the same place.
"""
import numpy as np

from data.format import DataError

FIM_TOKENS = {"prefix": "<fim_prefix>", "middle": "<fim_middle>", "suffix": "<fim_suffix>"}  # StarCoder's names


def check_rates(rate, spm_rate):
    for name, value in (("fim_rate", rate), ("fim_spm_rate", spm_rate)):
        if not 0 <= value <= 1:
            raise ValueError(f"config key '{name}' must be a fraction in [0, 1], got {value} (StarCoder used 0.5)")


def sentinel_ids(meta, data_dir):
    """{"prefix", "middle", "suffix"}: the sentinels' ids that data/prepare.py recorded in meta.json."""
    if not meta.get("fim"):
        raise DataError(f"{data_dir} was prepared without the FIM sentinel tokens (--no-fim-tokens, or before FIM "
                        f"existed): re-run data/prepare.py without --no-fim-tokens, or set fim_rate=0")
    return meta["fim"]


def permute(seq, ids, eos, rng, rate, spm_rate):
    """seq (1-D int array) with each of its documents rearranged with probability rate; the same length."""
    n = len(seq)
    ends = np.flatnonzero(seq == eos)
    parts = []
    for a, b in zip(np.r_[0, ends + 1], np.r_[ends, n]):  # document k is seq[a:b], then its EOS when b < n
        doc = seq[a:b]
        if len(doc) and rng.random() < rate:
            i, j = np.sort(rng.integers(0, len(doc) + 1, size=2))
            pre, mid, suf = doc[:i], doc[i:j], doc[j:]
            if rng.random() < spm_rate:
                doc = np.concatenate([[ids["prefix"], ids["suffix"]], suf, [ids["middle"]], pre, mid])
            else:
                doc = np.concatenate([[ids["prefix"]], pre, [ids["suffix"]], suf, [ids["middle"]], mid])
        parts += [doc, [eos]] if b < n else [doc]
    return np.concatenate(parts)[:n].astype(seq.dtype)
