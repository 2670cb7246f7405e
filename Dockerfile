# The captioning service for a trained student: docker build -t refine-serve . && docker run -p 8000:8000
# -v $PWD/runs/<id>/student/last:/student refine-serve. CPU torch wheels by default (a few hundred MB);
# pass --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 for a CUDA image.
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
WORKDIR /app
RUN pip install torch torchvision --index-url ${TORCH_INDEX}
COPY pyproject.toml README.md ./
COPY refine ./refine
COPY critics ./critics
COPY prompts ./prompts
RUN pip install '.[serve]'
EXPOSE 8000
HEALTHCHECK CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"
ENTRYPOINT ["python", "-m", "refine.serve", "/student", "--host", "0.0.0.0", "--port", "8000"]
