"""The shard format, the only module both stages import.

``schema`` (sample layout and validation), ``writer`` (one shard, atomically), ``reader`` (expansion and
iteration), ``ledger`` (index/failure parquet ledgers and the run directory layout), ``cli`` (``shards
info|verify``). Free of vision code on purpose: the student imports it.
"""
