"""Stage 4: evaluation — reference metrics (and, as they land, benchmark, judge, consult, report)."""
