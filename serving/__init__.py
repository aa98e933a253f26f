"""The Ray Serve Producer: user clicks -> student user vector -> Qdrant -> candidates (serving/producer.py).

    vlmrec serve --workdir .vlmrec/sample            # serving/cli.py; or `serve run serving.producer:app`

config.py   ProducerConfig (also the Serve user_config)
producer.py the deployment, its FastAPI routes, the model input and popular fallback functions
events.py   click pushes to the Feast online store (read-modify-write, serialised per user)
cli.py      `vlmrec serve`, and start()/stop() for the demo and tests
"""
