"""Paired-seed studies: specifications, runs and the comparison report (``moe-reg study``)."""
