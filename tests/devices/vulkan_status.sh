#!/usr/bin/env bash
# One line for `make test-devices`: can this machine build ggml's Vulkan backend (Mesa's lavapipe as the
# device), and if not, the evidence. The vendored ggml-vulkan (llama-cpp-python 0.3.36) uses
# vk::LayerSettingEXT (VK_EXT_layer_settings), which needs Vulkan headers >= 1.3.261.
set -u
needed=1.3.261
release="$(. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME") ($(cat /etc/debian_version 2>/dev/null || echo '?'))"
offered="$(apt-cache policy libvulkan-dev 2>/dev/null | awk '/Candidate:/ {print $2}')"
if [ -z "$offered" ] || [ "$offered" = "(none)" ]; then
    echo "Vulkan/lavapipe: not built: $release offers no libvulkan-dev through apt to check against $needed"
elif dpkg --compare-versions "$offered" lt "$needed"; then
    echo "Vulkan/lavapipe: not built: the vendored ggml-vulkan needs Vulkan headers >= $needed" \
         "(vk::LayerSettingEXT); $release offers libvulkan-dev $offered (apt-cache policy libvulkan-dev)"
else
    echo "Vulkan/lavapipe: $release offers libvulkan-dev $offered (>= $needed), but make test-devices" \
         "builds only the RPC backend: the lavapipe run is not wired in yet (see docs/PERFORMANCE.md, Devices)"
fi
