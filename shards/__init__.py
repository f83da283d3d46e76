"""The shard format, the only module both stages import.

``contract`` (the clip layout), ``schema`` (sample layout, validation and member digests), ``writer`` (one shard,
atomically, digests and byte ranges recorded), ``reader`` (expansion, indexing and reads by byte range), ``remote``
(shards at URLs: fsspec, ranged reads with retries), ``ledger`` (index/failure parquet ledgers and the run directory
layout), ``catalog`` (what a run's index records: digests, byte ranges, whether it finished), ``verify`` (a strict
check of a whole run), ``cli`` (``shards info|verify``). Free of
vision code on purpose: the student imports it.
"""
