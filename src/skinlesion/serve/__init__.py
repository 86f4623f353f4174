"""``skinlesion serve``: a FastAPI app (JSON API + one static page) around a trained run folder."""
