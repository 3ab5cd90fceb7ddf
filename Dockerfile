# The image of every gpte-ray node on Kubernetes (k8s/rayjob.yaml, k8s/nightly-cronjob.yaml):
# Ray's GPU image with torch and gpte-ray installed, every dependency pinned by
# cluster-constraints.txt, and the checkout (jobs/, configs/) at /home/ray/gpte-ray. A GPU pod
# scaled from zero starts Ray at once: nothing is installed per pod or per job.
#
#   docker build -t 123456789012.dkr.ecr.us-west-2.amazonaws.com/gpte-ray:0.1.0 .   # EDIT: your registry
#   docker push 123456789012.dkr.ecr.us-west-2.amazonaws.com/gpte-ray:0.1.0          # EDIT: your registry
#
# The Ray version here, in cluster-constraints.txt and in the manifests' rayVersion must match
# (tests/unit/test_cluster_yaml.py checks it).
FROM rayproject/ray:2.60.0-py311-gpu

COPY --chown=ray:users . /home/ray/gpte-ray
# PyPI's Linux x86_64 torch wheels bundle the CUDA 12 runtime; the node needs only the driver.
RUN pip install --no-cache-dir -c /home/ray/gpte-ray/cluster-constraints.txt "torch==2.13.0" \
 && pip install --no-cache-dir -c /home/ray/gpte-ray/cluster-constraints.txt "/home/ray/gpte-ray[cluster]" \
 && python -c "import gpte_ray, torch, lance, ray; assert ray.__version__ == '2.60.0', ray.__version__"

WORKDIR /home/ray/gpte-ray
