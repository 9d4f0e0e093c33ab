# Sourced by the benches that put the target across a shaped link (shaped-link.sh,
# rpo.sh with LINK=): two network namespaces joined by a veth, the near side's sending
# limited by a tbf qdisc. Needs root, ip and tc (iproute2).

# link_up NEAR FAR NEAR_IP FAR_IP: creates namespaces NEAR and FAR joined by a veth
# (vnear in NEAR at NEAR_IP/24, vfar in FAR at FAR_IP/24), loopbacks up; fails at the
# first step that cannot be done here (the caller's cleanup deletes the namespaces).
link_up() {
  local near=$1 far=$2
  ip netns add "$near" && ip netns add "$far" &&
    ip link add vnear netns "$near" type veth peer name vfar netns "$far" &&
    ip -n "$near" addr add "$3/24" dev vnear && ip -n "$far" addr add "$4/24" dev vfar &&
    ip -n "$near" link set lo up && ip -n "$far" link set lo up &&
    ip -n "$near" link set vnear up && ip -n "$far" link set vfar up
}

# link_shape NEAR RATE: limits what NEAR sends (the data direction) to RATE (a tc rate:
# 1gbit, 100mbit, …), replacing any limit before.
link_shape() {
  local burst latency
  case $2 in
    1gbit) burst=512kb latency=20ms ;;
    *) burst=128kb latency=50ms ;;
  esac
  ip netns exec "$1" tc qdisc replace dev vnear root tbf rate "$2" burst "$burst" latency "$latency"
}
