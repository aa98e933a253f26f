"""The demo page: the producers' candidates side by side, poster by poster, reacting to clicks (Streamlit).

    vlmrec ui --workdir .vlmrec/sample --api-url http://127.0.0.1:8000     # then open http://127.0.0.1:8501
    make demo UI=1                                                        # the Producer and the page together

A client of the Producer's HTTP API only, as a Mixer would be: no model is loaded here. The workspace gives
titles, categories and image paths (the catalogue) and the users to pick from (the events table).

config.py     UIConfig (also what `vlmrec ui` hands the page, as JSON in VLMREC_UI)
client.py     the HTTP client: every call timed, a clear ProducerDown when nothing answers
catalogue.py  titles, categories, images by path, users
page.py       the Streamlit script
cli.py        `vlmrec ui`, and start()/stop() of the page process for the demo and tests
"""
