"""Stage 1 of the recipe: the four SFT data sources made with a teacher, as Ray Data pipelines.

``self_instruct`` (distilled instructions), ``dialogues`` (distilled consultations), ``polish``
(real doctor answers and dialogues rewritten) and ``mixture`` (the hybrid SFT set).
"""
