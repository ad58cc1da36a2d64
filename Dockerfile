# The challenge image: `docker run ... -v inputs:/workspace/inputs -v outputs:/workspace/outputs IMAGE
# /bin/bash -c "sh predict.sh"`. Inference only: no torch (requirements-infer.txt), OpenVINO IR model.
# Plain Dockerfile syntax (no BuildKit-only features) so podman/buildah and old docker build it too.
# tools/make_submission.sh pins the base image (BASE_IMAGE); the default tag is what a local build finds.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /workspace

# Dependencies first: this layer is reused while the code and the model change.
COPY requirements-infer.txt ./
RUN python -m pip install --no-cache-dir -r requirements-infer.txt

# Exactly what infer.py imports, and the default model (IR only: .dockerignore drops *.onnx).
COPY data.py infer.py predict.sh ./
COPY models/default/ models/default/
# A ready compiled-model cache: predict.sh seeds the run's cache with it; OpenVINO uses a blob only on a
# CPU like the build machine's and compiles anew elsewhere.
RUN python infer.py --compile-only --cache-dir ov_cache && python -m compileall -q data.py infer.py

CMD ["sh", "predict.sh"]
