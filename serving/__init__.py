"""The Ray Serve Producer: user clicks -> student user vector -> Qdrant -> candidates, beside sibling
producers and a reference Mixer (serving/producer.py).

    vlmrec serve --workdir .vlmrec/sample            # serving/cli.py; or `serve run serving.producer:app`

config.py   ProducerConfig (also the Serve user_config)
api.py      the HTTP contract: request and response models (docs/API.md)
sources.py  the producers: student, sasrec, similar, popular (how each ranks)
loading.py  how a replica finds, checks and loads them (and `vlmrec serve`'s preflight)
mixer.py    the reference Mixer's quotas and de-duplicating interleave
producer.py the deployment, its FastAPI routes (candidates, mix, events, clicks, probes), the model input
guard.py    the HTTP edge: body limits (413), the optional write token (401), one error shape for all
events.py   click pushes to the Feast online store (merged by time, confirmed by a read-back, per user)
online.py   online-store calls from thread pools (sqlite: one lock per store, or the replica can freeze)
cli.py      `vlmrec serve`, and start()/stop() for the demo and tests
"""
