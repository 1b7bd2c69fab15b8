# cl-bidsapp: one image for CPU and GPU (the CUDA build of PyTorch; with no GPU visible the app
# runs on the CPU). Entry point: cl-bidsapp BIDS_DIR OUTPUT_DIR {participant,group} [options].
#
#   docker build -t clbidsapp/cl-bidsapp:latest .
#   docker run --rm --read-only --tmpfs /tmp -u "$(id -u):$(id -g)" \
#     -v /data/bids:/data:ro -v /data/out:/out -v /scratch/work:/work \
#     clbidsapp/cl-bidsapp:latest /data /out participant -w /work
#
# Build arguments (see docs/containers.md):
#   BASE_IMAGE           a Debian 12 image (CI here builds FROM a local debootstrap import)
#   VERSION, VCS_REF, BUILD_DATE   image labels
#   MODEL_URLS, MODEL_SHA256S      models baked in: space-separated URLs and their sha256
#   TEMPLATEFLOW         s3 (fetch MNI152NLin2009cAsym and check its sha256) | stand-in (offline
#                        CI only: nilearn's MNI152 2009a under the TemplateFlow name) | none
#   TEMPLATEFLOW_SHA256S "T1W_SHA256 BRAIN_MASK_SHA256" when the s3 files are not pinned in
#                        cl_bidsapp/hpc/templates.py
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

ARG VERSION=0.1.0
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
ARG MODEL_URLS=""
ARG MODEL_SHA256S=""
ARG TEMPLATEFLOW=s3
ARG TEMPLATEFLOW_SHA256S=""
# Only for builds behind a TLS-intercepting proxy (CI here): the proxy's CA bundle, bind-mounted.
ARG PIP_CERT=""

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Debian's python3 is 3.11 on bookworm, the version every wheel of the stack exists for.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/cl-bidsapp/venv \
    PATH=/opt/cl-bidsapp/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY . /tmp/src
# One layer for the whole Python stack: the CUDA wheels alone are ~3 GB and a second copy in
# an intermediate layer would double the image.
# pip byte-compiles as it installs: with a read-only root nothing could be cached later.
RUN python3 -m venv "${VIRTUAL_ENV}" \
 && pip install --progress-bar off /tmp/src \
 && rm -rf /tmp/src /root/.cache

# Models and templates are baked in (and checked) here, because nothing may be downloaded
# when the app runs: compute nodes are often offline. (chmod only these folders: touching the
# venv's files would copy all of them into a new layer.)
ENV CL_BIDSAPP_MODELS=/opt/cl-bidsapp/models \
    TEMPLATEFLOW_HOME=/opt/templateflow \
    TEMPLATEFLOW_AUTOUPDATE=0
COPY docker/install-models.sh /opt/cl-bidsapp/install-models.sh
RUN /opt/cl-bidsapp/install-models.sh "${MODEL_URLS}" "${MODEL_SHA256S}" \
 && python -m cl_bidsapp.hpc.templates seed "${TEMPLATEFLOW_HOME}" --source "${TEMPLATEFLOW}" \
      --sha256 "${TEMPLATEFLOW_SHA256S}" \
 && chmod -R a+rX "${CL_BIDSAPP_MODELS}" "${TEMPLATEFLOW_HOME}"

# Caches go to /tmp (a tmpfs with --read-only; the host's /tmp under Apptainer). When /tmp is
# not writable either, cl-bidsapp moves them into the work folder at start.
ENV HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/.cache/matplotlib \
    TORCH_HOME=/tmp/.cache/torch \
    TRITON_CACHE_DIR=/tmp/.cache/triton \
    NUMBA_CACHE_DIR=/tmp/.cache/numba \
    CL_BIDSAPP_CONTAINER=docker \
    CL_BIDSAPP_CONTAINER_TAG=clbidsapp/cl-bidsapp:${VERSION}

# Fail the build, not the first user, when the stack does not import or the version is off.
RUN cl-bidsapp --version | grep -qx "cl-bidsapp v${VERSION}" \
 && python -c "import torch, nnunetv2, deepbet, nipype, bids; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" \
 && cl-bidsapp-models list

LABEL org.opencontainers.image.title="cl-bidsapp" \
      org.opencontainers.image.description="Cortical-lesion segmentation in MP2RAGE/MPRAGE MRI with nnU-Net v2, as a BIDS App" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.source="https://github.com/cl-bidsapp/cl-bidsapp" \
      org.opencontainers.image.url="https://github.com/cl-bidsapp/cl-bidsapp" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.cl-bidsapp.templateflow="${TEMPLATEFLOW}" \
      org.cl-bidsapp.models="${MODEL_URLS}"

# Any UID works (caches are redirected); this is only the default for `docker run` without -u.
USER 65534:65534
WORKDIR /tmp
ENTRYPOINT ["cl-bidsapp"]
