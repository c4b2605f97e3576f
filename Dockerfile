# mriflow BIDS App: docker run -v /data:/data:ro -v /out:/out mriflow /data /out participant
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    NIPYPE_NO_ET=1 \
    MPLBACKEND=Agg \
    OMP_NUM_THREADS=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 graphviz \
    && rm -rf /var/lib/apt/lists/*

# CPU build of PyTorch first so the deep extra never pulls a CUDA build
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /src/mriflow
COPY pyproject.toml README.md ./
COPY mriflow ./mriflow
RUN pip install '.[deep]' && mriflow --version

# the bundled example, for `docker run mriflow /opt/example /out participant`
COPY bids_examples /opt/example

WORKDIR /work
ENTRYPOINT ["mriflow"]
CMD ["--help"]
