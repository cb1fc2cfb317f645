#: Version of the engine's numbers: part of every result cache key and study record, so a
#: change in what a figure means (0.2.0: one close-out horizon, rates capped at max_rate,
#: windows by loss interval, premature counting the trigger bar, latency-0 fills at the
#: adverse extreme, one insurance fund per venue) never serves a result computed under the
#: old conventions.
ENGINE_VERSION = "0.2.0"
