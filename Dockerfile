# Qwen-7B-Chat with qwen_trtllm on an NVIDIA GPU.
#   docker build -t qwen-trtllm .
#   docker run --gpus all -v /path/to/Qwen-7B-Chat:/ckpt qwen-trtllm
# runs the seed's workflow (convert -> build -> chat) on the mounted Hugging Face checkpoint.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

WORKDIR /opt/qwen_trtllm
COPY requirements.txt pyproject.toml README.md ./
COPY qwen_trtllm ./qwen_trtllm
COPY examples ./examples
# keep the image's CUDA torch: install everything else from requirements.txt
RUN grep -v '^torch' requirements.txt > /tmp/requirements-notorch.txt \
    && pip install --no-cache-dir -r /tmp/requirements-notorch.txt \
    && pip install --no-cache-dir --no-deps -e .

WORKDIR /work
CMD ["sh", "-c", "python3 /opt/qwen_trtllm/examples/qwen/hf_qwen_convert.py -i /ckpt -o ./c-model/Qwen --tensor-parallelism 1 --storage-type float16 --force && python3 /opt/qwen_trtllm/examples/qwen/build.py --model_dir ./c-model/Qwen/1-gpu --dtype float16 --max_batch_size 2 --force && python3 /opt/qwen_trtllm/examples/qwen/run.py --max_output_len 128 --streaming"]
