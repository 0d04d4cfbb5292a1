"""Stage 4: evaluation — the metric benchmark, the pairwise judge, consultations with a teacher-played
patient, the doctors' forms and the report."""
