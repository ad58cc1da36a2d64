# The challenge image: `docker run ... -v inputs:/workspace/inputs -v outputs:/workspace/outputs IMAGE
# /bin/bash -c "sh predict.sh"`. Inference only: no torch (requirements-infer.txt), OpenVINO IR model.
# Plain Dockerfile syntax (no BuildKit-only features) so podman/buildah and old docker build it too.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /workspace

# Dependencies first: this layer is reused while the code and the model change.
COPY requirements-infer.txt ./
RUN python -m pip install --no-cache-dir -r requirements-infer.txt

COPY data.py infer.py predict.sh ./
# The default model (IR only: .dockerignore drops *.onnx, the image has no onnxruntime).
COPY models/default/ models/default/

CMD ["sh", "predict.sh"]
