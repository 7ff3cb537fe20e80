"""A retrieval-heavy synthetic task: many key/value definitions in a long context, queried later
(multi-query associative recall, "MQAR", after Arora et al., "Zoology", 2023).

Every key and every value is ONE token from ids reserved above the byte tokenizer's 258:

    keys     [258, 258 + num_keys)
    values   [258 + num_keys, 258 + num_keys + num_values)

A sequence is a run of two-token records `key value`:

    definition   a fresh key (never defined before in the sequence) and a random value
    query        a key defined earlier in the sequence, followed by the value it was defined with

After the first record each record is a query with probability `query_fraction`, asking for a key drawn
uniformly from all keys defined so far, so that every distance from one record to the whole context is
trained. With `mean_gap` > 0 each definition is followed by filler: a number of random byte tokens
drawn uniformly from [0, 2 * mean_gap]; queries follow one another without filler. A sequence then holds
fewer keys to tell apart while its distances stay as long, and with a high `query_fraction` it still asks
many questions (a record cut by the sequence's end is left out). With `gap_after` = "records" every
record, queries too, is followed by its filler: facts then sit sparsely in low-information bytes at any
part of the sequence, as a needle does in the needle-in-a-haystack test (with bursty facts, whose records
are nearly all queries, filler after definitions alone would leave most of the sequence dense).
With `query_once` each key is queried at most once (a query drawn when every defined key has been asked
becomes a definition): the answer is then always at the key's definition, never at a nearer earlier query
of the same key. It needs `query_fraction` below 0.5, so that the keys not yet asked pile up and a query
can reach back across the whole context.
With `queries_last` every definition comes first (each with its filler) and the queries follow in one block
at the end, each asking a different definition in random order: the layout of a needle test with many
needles, where every distance from the question block back to the start of the sequence is trained
equally and nothing can be copied from a nearer query. The block holds query_fraction / (1 - query_fraction)
queries per definition (at least one), so query_fraction must be below 0.5 here too.
With `facts_per_sequence` = F > 0 a sequence states only F facts, each many times (bursty data, which
shortens the loss plateau before in-context recall forms: Zucchet et al., arXiv 2505.17863): F
distinct keys and a value for each; record 0 defines the first fact, and each later record is, while facts
remain undefined, a query with probability query_fraction, else the next definition; once all F are defined
every record is a query. A query restates a uniformly drawn fact defined so far, value included, so each fact
recurs about (records - F) / F times and every query can be answered from the nearest earlier statement of
its key. Small `num_keys` and `num_values` then suffice at any length (small vocabularies and many queries
per sequence are what let MQAR be learned quickly in Zoology).
A model trained on bursty facts alone learns to pool a key's many statements and recalls a fact stated
once poorly, yet that is what a needle is. `single_facts` = S > 0 (with facts_per_sequence) adds S facts
per sequence that are stated once and asked once, later, at any distance: each takes two query records
of the bursty facts (a statement and its question, drawn uniformly among them; the bursty facts keep
their definitions, so their queries stay answerable) and a key of its own. Record 0 is also a candidate for
a statement, as a needle at depth 0% sits there: the first fact is then stated by its first remaining query.
At long lengths that happens rarely (record 0 is one candidate of thousands); `single_fact_at_start` = p
puts a single fact's statement at record 0 in a share p of the sequences.
The loss mask covers only the value tokens of queries (everything else is random). No markers tell
definitions from queries: a model need not know, since a key it has not seen has no answer to learn.

Sequences are a pure function of (seed, stream, index): training and validation use separate streams,
so both models of a comparison see the same samples in the same order. numpy only (no megatron), so
recipe checks can import this module before megatron-core is loaded. The needle evaluation
(megatron_nsa.eval.haystack) lays its haystacks out with the same records.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional, Tuple

import numpy

from .tokenizer import BYTE_VOCAB_SIZE

TRAIN_STREAM, VALID_STREAM, NEEDLE_STREAM = 0, 1, 2
FIRST_KEY_ID = BYTE_VOCAB_SIZE  # after the byte tokenizer's 256 bytes, end-of-document and padding
RECORD_LENGTH = 2  # key, value
BYTE_RANGE = 256  # filler tokens between records are bytes 0..255
GAP_AFTER = ("definitions", "records")  # the records that filler follows when mean_gap > 0


@dataclasses.dataclass(frozen=True)
class RetrievalFormat:
    num_keys: int = 16384
    num_values: int = 256
    query_fraction: float = 0.25
    mean_gap: int = 0  # filler tokens after each definition: uniform in [0, 2 * mean_gap]
    gap_after: str = "definitions"  # which records the filler follows: "definitions" or "records" (all)
    query_once: bool = False  # each key queried at most once: no answer can be copied from an earlier query
    queries_last: bool = False  # all definitions first, then one block of queries (each key at most once)
    facts_per_sequence: int = 0  # > 0: only this many facts per sequence, each restated by many queries
    single_facts: int = 0  # with facts_per_sequence: this many more facts, each stated once and asked once
    single_fact_at_start: float = 0.0  # share of sequences whose first single fact is stated at record 0

    @property
    def first_value_id(self) -> int:
        return FIRST_KEY_ID + self.num_keys

    @property
    def vocab_size(self) -> int:
        """Token ids the task uses: the byte tokenizer's, then the key and value ranges."""
        return self.first_value_id + self.num_values

    @classmethod
    def of(cls, settings) -> "RetrievalFormat":
        """From any object with these fields (e.g. the recipe's `retrieval` section)."""
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})


def check_settings(settings) -> None:
    """ValueError naming the field, its value and what is allowed."""
    for name, low, high in (("num_keys", 2, 1 << 20), ("num_values", 2, 1 << 16), ("mean_gap", 0, 1 << 16)):
        value = getattr(settings, name)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError(f"retrieval.{name}={value!r} is not allowed: it must be an integer in [{low}, {high}]")
    facts = settings.facts_per_sequence
    if not isinstance(facts, int) or isinstance(facts, bool) or not 0 <= facts < settings.num_keys:
        raise ValueError(f"retrieval.facts_per_sequence={facts!r} is not allowed: it must be an integer in "
                         f"[0, retrieval.num_keys - 1 = {settings.num_keys - 1}] (0: a fresh key per definition; one "
                         "key stays spare for the needle test)")
    single = settings.single_facts
    if not isinstance(single, int) or isinstance(single, bool) or single < 0:
        raise ValueError(f"retrieval.single_facts={single!r} is not allowed: it must be an integer >= 0")
    if single and not facts:
        raise ValueError(f"retrieval.single_facts={single} is not allowed with retrieval.facts_per_sequence=0: single "
                         "facts take the place of queries of the bursty facts; set retrieval.facts_per_sequence > 0")
    if single and facts + single >= settings.num_keys:
        raise ValueError(f"retrieval.single_facts={single} is not allowed with retrieval.facts_per_sequence={facts} "
                         f"and retrieval.num_keys={settings.num_keys}: the two together must stay below num_keys "
                         f"(every fact has its own key and one key stays spare for the needle test), so at most "
                         f"{settings.num_keys - 1 - facts}")
    at_start = settings.single_fact_at_start
    if not isinstance(at_start, (int, float)) or isinstance(at_start, bool) or not 0 <= at_start <= 1:
        raise ValueError(f"retrieval.single_fact_at_start={at_start!r} is not allowed: it must be a number in [0, 1]")
    if at_start and not single:
        raise ValueError(f"retrieval.single_fact_at_start={at_start} is not allowed with retrieval.single_facts=0: "
                         "it moves a single fact's statement to record 0; set retrieval.single_facts > 0")
    if settings.gap_after not in GAP_AFTER:
        raise ValueError(f"retrieval.gap_after={settings.gap_after!r} is not allowed: it must be one of "
                         f"{', '.join(GAP_AFTER)}")
    if settings.gap_after == "records" and settings.queries_last:
        raise ValueError("retrieval.gap_after='records' is not allowed with retrieval.queries_last=true: the final "
                         "query block has no filler; set retrieval.gap_after=definitions")
    for name in ("query_once", "queries_last"):
        if not isinstance(getattr(settings, name), bool):
            raise ValueError(f"retrieval.{name}={getattr(settings, name)!r} is not allowed: it must be true or false")
    fraction = settings.query_fraction
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction < 1:
        raise ValueError(f"retrieval.query_fraction={fraction!r} is not allowed: it must be a number in (0, 1)")
    if settings.query_once and fraction >= 0.5:
        raise ValueError(f"retrieval.query_fraction={fraction!r} is not allowed with retrieval.query_once=true: it "
                         "must be below 0.5, or queries drain the keys not yet asked and only ever ask the newest ones")
    if settings.queries_last and fraction >= 0.5:
        raise ValueError(f"retrieval.query_fraction={fraction!r} is not allowed with retrieval.queries_last=true: it "
                         "must be below 0.5, so that every query of the final block asks a different definition")
    for name in ("query_once", "queries_last"):
        if facts and getattr(settings, name):
            raise ValueError(f"retrieval.facts_per_sequence={facts} is not allowed with retrieval.{name}=true: its "
                             "facts are asked many times each; set retrieval.facts_per_sequence=0 or "
                             f"retrieval.{name}=false")


def keys_needed(num_tokens: int) -> int:
    """The most records a sequence of `num_tokens` holds, so the most distinct keys it can define."""
    return math.ceil(num_tokens / RECORD_LENGTH)


def distinct_keys_needed(fmt: RetrievalFormat, num_tokens: int) -> int:
    """The most distinct keys a sequence of `num_tokens` in format `fmt` defines."""
    records = keys_needed(num_tokens)
    return min(records, fmt.facts_per_sequence + fmt.single_facts) if fmt.facts_per_sequence else records


def check_key_space(fmt: RetrievalFormat, num_tokens: int, what: str) -> None:
    """ValueError unless every record of `num_tokens` tokens (`what`: where the length comes from) can
    define a key of its own."""
    needed = distinct_keys_needed(fmt, num_tokens)
    if fmt.num_keys < needed:
        raise ValueError(f"retrieval.num_keys={fmt.num_keys} is too small for {what}={num_tokens}: a sequence of "
                         f"{num_tokens} tokens holds up to {needed} definitions, each with a fresh key; raise "
                         f"retrieval.num_keys to at least {needed}")


def draw_queries(num_records: int, rng: numpy.random.Generator, fmt: RetrievalFormat) -> numpy.ndarray:
    """Which records are queries: [num_records] bool, each with probability query_fraction but record 0.
    With query_once, a query drawn when every key defined so far has been asked becomes a definition; with
    facts_per_sequence, every record after the last fact's definition is a query."""
    is_query = rng.random(num_records) < fmt.query_fraction
    is_query[0] = False
    if fmt.facts_per_sequence:
        definitions_so_far = numpy.cumsum(~is_query)  # [num_records]
        last_definition = numpy.searchsorted(definitions_so_far, fmt.facts_per_sequence)  # num_records if never
        is_query[last_definition + 1:] = True
    if fmt.query_once:
        unasked = 0  # keys defined so far and not yet queried
        for record in range(num_records):
            if is_query[record] and unasked == 0:
                is_query[record] = False
            unasked += -1 if is_query[record] else 1
    return is_query


def draw_queried_definitions(is_query: numpy.ndarray, rng: numpy.random.Generator,
                             fmt: RetrievalFormat) -> numpy.ndarray:
    """[num_records] int64: the definition (its index among the definitions) each record asks for or makes.
    A query asks a uniformly drawn earlier definition, one not asked before when fmt.query_once."""
    defined_so_far = numpy.cumsum(~is_query)  # [num_records] definitions up to and including each record
    if not fmt.query_once:
        return numpy.where(is_query, (rng.random(is_query.size) * defined_so_far).astype(numpy.int64),
                           defined_so_far - 1)
    draws = rng.random(is_query.size)  # [num_records]
    definition = defined_so_far - 1
    unasked = []  # definitions not yet queried, in no particular order
    for record in range(is_query.size):
        if is_query[record]:
            pick = int(draws[record] * len(unasked))
            unasked[pick], unasked[-1] = unasked[-1], unasked[pick]
            definition[record] = unasked.pop()
        else:
            unasked.append(int(definition[record]))
    return definition


def draw_definitions(num_definitions: int, rng: numpy.random.Generator, fmt: RetrievalFormat,
                     exclude_key: Optional[int] = None) -> Tuple[numpy.ndarray, numpy.ndarray]:
    """(keys, values), each [num_definitions] int64: distinct keys other than `exclude_key`, in the order
    they get defined, and a random value for each."""
    available = fmt.num_keys - (exclude_key is not None)
    if num_definitions > available:
        raise ValueError(f"a retrieval sequence needs {num_definitions} distinct keys but retrieval.num_keys="
                         f"{fmt.num_keys} gives only {available}; raise num_keys or shorten the sequence")
    # one spare to drop exclude_key; a draw without replacement costs O(num_definitions), where a
    # permutation of all keys cost O(num_keys)
    keys = FIRST_KEY_ID + rng.choice(fmt.num_keys, size=min(num_definitions + 1, fmt.num_keys), replace=False)
    keys = keys[keys != exclude_key][:num_definitions]
    values = fmt.first_value_id + rng.integers(0, fmt.num_values, size=num_definitions)
    return keys, values


def generate_records(num_records: int, rng: numpy.random.Generator, fmt: RetrievalFormat,
                     exclude_key: Optional[int] = None,
                     is_query: Optional[numpy.ndarray] = None) -> Tuple[numpy.ndarray, numpy.ndarray]:
    """`num_records` records -> (tokens [num_records, 2] int64, answer mask of the same shape).

    Record 0 is always a definition; `exclude_key` (a key token id) is never defined nor queried;
    `is_query` ([num_records] bool from draw_queries) fixes which records are queries (default: drawn here).
    """
    if is_query is None:
        is_query = draw_queries(num_records, rng, fmt)
    defined_so_far = numpy.cumsum(~is_query)  # [num_records] definitions up to and including each record
    num_definitions = int(defined_so_far[-1])
    keys, values = draw_definitions(num_definitions, rng, fmt, exclude_key)
    # Definition j defines keys[j]; a query asks one of the definitions before it.
    record = draw_queried_definitions(is_query, rng, fmt)
    tokens = numpy.stack([keys[record], values[record]], axis=1)
    answer_mask = numpy.zeros_like(tokens, dtype=bool)
    answer_mask[:, 1] = is_query
    if fmt.single_facts:
        add_single_facts(tokens, answer_mask, is_query, keys, rng, fmt, exclude_key)
    return tokens, answer_mask


def add_single_facts(tokens: numpy.ndarray, answer_mask: numpy.ndarray, is_query: numpy.ndarray,
                     used_keys: numpy.ndarray, rng: numpy.random.Generator, fmt: RetrievalFormat,
                     exclude_key: Optional[int] = None) -> None:
    """Writes fmt.single_facts facts (as many as half the query records allow) over query records, in place:
    each a fresh key with a random value, stated at one record and asked at a later one. Record 0 may hold a
    statement too, so that facts stated at the very start of a sequence are trained on; the bursty fact it
    defined is then stated by its first remaining query, which is no longer asked. With
    fmt.single_fact_at_start = p, in a share p of the sequences where no statement fell on record 0 the
    earliest one moves there (drawn after everything else, so the rest of the sample is as without it)."""
    query_records = numpy.flatnonzero(is_query)
    count = min(fmt.single_facts, query_records.size // 2)
    if count == 0:
        return
    candidates = numpy.concatenate([[0], query_records])  # record 0 is a definition, never a query
    pairs = numpy.sort(rng.choice(candidates, size=(count, 2), replace=False), axis=1)  # [count, 2]: statement, question
    displaced_key = tokens[0, 0]
    is_free = numpy.ones(fmt.num_keys, dtype=bool)
    is_free[used_keys - FIRST_KEY_ID] = False
    if exclude_key is not None:
        is_free[exclude_key - FIRST_KEY_ID] = False
    free = FIRST_KEY_ID + numpy.flatnonzero(is_free)  # keys no other fact uses, ascending
    keys = rng.choice(free, size=count, replace=False)  # [count]
    values = fmt.first_value_id + rng.integers(0, fmt.num_values, size=count)  # [count]
    statements, questions = pairs[:, 0], pairs[:, 1]  # distinct records: drawn without replacement
    if fmt.single_fact_at_start and statements.min() > 0 and rng.random() < fmt.single_fact_at_start:
        statements[statements.argmin()] = 0  # its question stays later; the query record it held stays a query
    tokens[statements] = tokens[questions] = numpy.stack([keys, values], axis=1)
    answer_mask[statements, 1], answer_mask[questions, 1] = False, True
    if (statements == 0).any():
        restated = numpy.flatnonzero(tokens[:, 0] == displaced_key)  # the displaced fact's remaining queries
        if restated.size:
            answer_mask[restated[0], 1] = False


def filler_tokens(num_tokens: int, rng: numpy.random.Generator) -> numpy.ndarray:
    """[num_tokens] int64 random filler bytes, records to be written over them."""
    return rng.integers(0, BYTE_RANGE, size=num_tokens)


def lay_out(num_tokens: int, rng: numpy.random.Generator, fmt: RetrievalFormat,
            exclude_key: Optional[int] = None) -> Tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray]:
    """Exactly `num_tokens` tokens starting at a record: (tokens [num_tokens] int64, answer mask
    [num_tokens] bool, record_starts [num_records] offsets). Without gaps the last record may be cut;
    with gaps (fmt.mean_gap > 0) every record is whole and filler follows each definition (each record with
    fmt.gap_after = "records"). With fmt.queries_last see lay_out_queries_last."""
    if fmt.queries_last:
        return lay_out_queries_last(num_tokens, rng, fmt, exclude_key)
    if fmt.mean_gap == 0:
        tokens, answer_mask = generate_records(keys_needed(num_tokens), rng, fmt, exclude_key)
        record_starts = numpy.arange(0, num_tokens, RECORD_LENGTH)
        return tokens.reshape(-1)[:num_tokens], answer_mask.reshape(-1)[:num_tokens], record_starts
    is_query = draw_queries(keys_needed(num_tokens), rng, fmt)  # [max records]
    gaps = rng.integers(0, 2 * fmt.mean_gap + 1, size=is_query.size)  # [max records]
    if fmt.gap_after == "definitions":
        gaps[is_query] = 0
    record_ends = numpy.cumsum(RECORD_LENGTH + gaps) - gaps  # [max records] offset after each record's value
    num_records = int(numpy.searchsorted(record_ends, num_tokens, side="right"))  # whole records that fit
    drawn = max(num_records, 1)
    records, record_mask = generate_records(drawn, rng, fmt, exclude_key, is_query[:drawn])
    tokens = filler_tokens(num_tokens, rng)  # [num_tokens] filler bytes, records written over
    answer_mask = numpy.zeros(num_tokens, dtype=bool)
    record_starts = record_ends[:num_records] - RECORD_LENGTH
    positions = record_starts[:, None] + numpy.arange(RECORD_LENGTH)  # [num_records, 2]
    tokens[positions] = records[:num_records]
    answer_mask[positions] = record_mask[:num_records]
    return tokens, answer_mask, record_starts


def lay_out_queries_last(num_tokens: int, rng: numpy.random.Generator, fmt: RetrievalFormat,
                         exclude_key: Optional[int] = None) -> Tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray]:
    """Exactly `num_tokens` tokens: as many definitions (each followed by its filler gap) as fit together
    with their queries, filler bytes for what is left, then the query block, which ends the sequence.
    Returns (tokens [num_tokens] int64, answer mask [num_tokens] bool, record_starts [num_records]: the
    definitions', then the queries' offsets)."""
    if num_tokens < 2 * RECORD_LENGTH:
        raise ValueError(f"a retrieval sequence with retrieval.queries_last=true needs at least {2 * RECORD_LENGTH} "
                         f"tokens (one definition and its query), got {num_tokens}")
    most = keys_needed(num_tokens)
    gaps = rng.integers(0, 2 * fmt.mean_gap + 1, size=most)  # [most] filler after each definition
    definitions_end = numpy.cumsum(RECORD_LENGTH + gaps)  # [most] tokens of the first 1, 2, ... definitions
    counts = numpy.arange(1, most + 1)  # [most] candidate numbers of definitions
    query_counts = numpy.clip((counts * fmt.query_fraction / (1 - fmt.query_fraction)).astype(numpy.int64), 1, counts)
    fitting = numpy.flatnonzero(definitions_end + RECORD_LENGTH * query_counts <= num_tokens)
    if fitting.size == 0:  # one definition without its gap and its query: the rest is filler
        gaps[0], num_definitions = 0, 1
    else:
        num_definitions = int(fitting[-1]) + 1
    num_queries = int(query_counts[num_definitions - 1])
    keys, values = draw_definitions(num_definitions, rng, fmt, exclude_key)
    asked = rng.choice(num_definitions, size=num_queries, replace=False)  # [num_queries] in asking order
    definition_starts = numpy.cumsum(RECORD_LENGTH + gaps[:num_definitions]) - gaps[:num_definitions] - RECORD_LENGTH
    query_starts = num_tokens - RECORD_LENGTH * (num_queries - numpy.arange(num_queries))  # [num_queries]
    tokens = filler_tokens(num_tokens, rng)  # [num_tokens] filler bytes, records written over
    answer_mask = numpy.zeros(num_tokens, dtype=bool)
    tokens[definition_starts], tokens[definition_starts + 1] = keys, values
    tokens[query_starts], tokens[query_starts + 1] = keys[asked], values[asked]
    answer_mask[query_starts + 1] = True
    return tokens, answer_mask, numpy.concatenate([definition_starts, query_starts])


def generate_sequence(num_tokens: int, rng: numpy.random.Generator, fmt: RetrievalFormat,
                      exclude_key: Optional[int] = None) -> Tuple[numpy.ndarray, numpy.ndarray]:
    """Exactly `num_tokens` tokens starting at a record (see lay_out):
    (tokens [num_tokens] int64, answer mask [num_tokens] bool)."""
    tokens, answer_mask, _ = lay_out(num_tokens, rng, fmt, exclude_key)
    return tokens, answer_mask


def sample_rng(seed: int, stream: int, index: int) -> numpy.random.Generator:
    return numpy.random.default_rng([seed, stream, index])


class RetrievalDataset:
    """`num_samples` sequences in the layout of megatron's GPTDataset items: tokens / labels (the next
    token) / loss_mask (1 on the value tokens of queries) / position_ids, each [seq_length]."""

    def __init__(self, fmt: RetrievalFormat, seq_length: int, num_samples: int, seed: int, stream: int):
        check_key_space(fmt, seq_length + 1, "data.seq_length (+1 for the labels)")
        self.fmt = fmt
        self.seq_length = seq_length
        self.num_samples = max(num_samples, 1)
        self.seed = seed
        self.stream = stream

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Dict[str, numpy.ndarray]:
        tokens, answer_mask = generate_sequence(self.seq_length + 1, sample_rng(self.seed, self.stream, index),
                                                self.fmt)
        return {
            "tokens": tokens[:-1],
            "labels": tokens[1:],
            "loss_mask": answer_mask[1:].astype(numpy.float32),
            "position_ids": numpy.arange(self.seq_length, dtype=numpy.int64),
        }


def retrieval_datasets(recipe, num_train_samples: int, num_valid_samples: int):
    """(train, validation) datasets of data.source=retrieval."""
    fmt = RetrievalFormat.of(recipe.retrieval)
    seq_length, seed = recipe.data.seq_length, recipe.training.seed
    return (RetrievalDataset(fmt, seq_length, num_train_samples, seed, TRAIN_STREAM),
            RetrievalDataset(fmt, seq_length, num_valid_samples, seed, VALID_STREAM))
