"""The Ray Data stages. One contract: each is a small callable class over Arrow batches whose input and output
schemas are declared in `schemas/stages.py`; counts travel outside the rows (`pipeline.run_stats`).

    listing (`pipeline.io.listing`) ─ listing_schema ─► DecodeStage ─ decoded_schema ─► ModelStage
        ─ modeled_schema ─► the writer (`pipeline.store`)
"""
