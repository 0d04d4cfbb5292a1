"""Model factories.

:mod:`huatuo_ray.models.tiny` builds tiny random Llama models and a byte-level BPE tokenizer on the
spot, so that tests and the demo run end to end on a CPU with nothing downloaded from any hub.
``demo_corpus.txt`` is original Chinese consultation text bundled to train that tokenizer and to
seed the demo.

:mod:`huatuo_ray.models.fetch` brings model folders named by URIs (``s3://``, ``gs://``,
``file://``) to a node-local, checksummed cache before anything loads them.

:mod:`huatuo_ray.models.kernels` holds the kernel choices every model process makes alike.
"""
