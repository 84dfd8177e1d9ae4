// Giving up root after the privileged start-up work ([server] user and group).
#pragma once

#include <string>

namespace squall::daemon {

// Switches the process to `user` and `group` ("" = the user's primary group): initgroups,
// setgid, setuid, then checks that root cannot be regained. Call after the listening sockets
// are bound and the log files opened. Returns a line for the log, or "" when `user` is empty
// or the process already runs as that user and group. Throws std::runtime_error with a message
// naming the key and the reason: unknown user or group, not running as root, or any failing
// call; the caller must then exit rather than go on with root's privileges.
std::string drop_privileges(const std::string& user, const std::string& group);

}  // namespace squall::daemon
