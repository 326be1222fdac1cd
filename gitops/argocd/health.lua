-- Argo CD health check for kubetune.io/FineTuneJob.
-- Installed as argocd-cm key resource.customizations.health.kubetune.io_FineTuneJob: `make generate`
-- writes argocd-cm-patch.yaml around this file, verbatim (tests/test_generated.py fails when it is stale).
--
-- Argo CD runs it in gopher-lua (Lua 5.1) with only the base, table and a safe os library loaded: no
-- string or math functions and no string methods, so this script uses `..`, tostring and table.concat.
--
--   no status yet, or status older than the spec  Progressing  waiting for the operator
--   Pending (Unschedulable, ImagePullFailed...)   Progressing  a GPU job waiting for capacity is normal
--   Pending, SecretMissing or WorkspaceConflict   Degraded     a person must act: "<reason>: <message>"
--   Queued (Kueue has not admitted the Job)       Progressing  waiting for admission
--   Suspended (runPolicy.suspend)                 Suspended
--   Running                                       Progressing  "running: Training 37% loss 1.2346 eta 1h12m"
--   Succeeded                                     Healthy
--   Failed (OOMKilled, JobRejected, InvalidSpec...) Degraded     "<reason>: <message>"

local function condition(status, kind)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function describe(c, fallback)
  if c == nil then
    return fallback
  end
  local message = c.message
  if message == nil or message == "" then
    message = fallback
  end
  if c.reason ~= nil and c.reason ~= "" then
    return c.reason .. ": " .. message
  end
  return message
end

local function result(health, message)
  return {status = health, message = message}
end

-- The condition that carries status.reason (the operator's explanation of the state).
local function explanation(status)
  if status.reason == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.reason == status.reason and c.type ~= "Valid" then
      return c
    end
  end
  return {reason = status.reason}
end

-- Pending for a reason only a person can clear.
local needsPerson = {SecretMissing = true, WorkspaceConflict = true}

local status = obj.status
local spec = obj.spec or {}
local runPolicy = spec.runPolicy or {}

if status == nil or status.state == nil then
  return result("Progressing", "waiting for the operator to pick up this FineTuneJob")
end

local generation = tonumber(obj.metadata.generation)
local observed = tonumber(status.observedGeneration)
if generation ~= nil and (observed == nil or observed < generation) then
  return result("Progressing",
    "waiting for the operator to observe generation " .. tostring(generation) ..
    " (status is of generation " .. tostring(observed) .. ")")
end

local state = status.state

if state == "Succeeded" then
  local message = "training finished"
  if status.loss ~= nil then
    message = message .. ", loss " .. status.loss
  end
  return result("Healthy", message)
end

if state == "Failed" then
  return result("Degraded", describe(condition(status, "Failed"), "the run failed"))
end

if state == "Suspended" then
  local message = "suspended by runPolicy.suspend; resumes from its last checkpoint"
  if status.progress ~= nil then
    message = message .. " (at " .. status.progress .. ")"
  end
  return result("Suspended", message)
end

if state == "Queued" then
  -- Kueue holds the Job until it admits it: waiting, not paused by a person.
  if runPolicy.queueName ~= nil then
    return result("Progressing",
      "queued: waiting for Kueue to admit the Job (LocalQueue " .. runPolicy.queueName .. ")")
  end
  return result("Progressing", "queued: waiting for Kueue to admit the Job")
end

local why = explanation(status)

if state == "Running" then
  local parts = {}
  if status.phase ~= nil then
    table.insert(parts, status.phase)
  end
  if status.progress ~= nil then
    table.insert(parts, status.progress)
  end
  if status.loss ~= nil then
    table.insert(parts, "loss " .. status.loss)
  end
  if status.eta ~= nil then
    table.insert(parts, "eta " .. status.eta)
  end
  local restarts = tonumber(status.restarts)
  if restarts ~= nil and restarts > 0 then
    table.insert(parts, "restarts " .. tostring(restarts))
  end
  local message = "running"
  if #parts > 0 then
    message = "running: " .. table.concat(parts, " ")
  end
  -- Running, but not training right now: a preempted pod's replacement, a retry, a pod unschedulable.
  if why ~= nil and status.reason ~= "TrainerRunning" then
    message = message .. "; " .. describe(why, "no details")
  end
  return result("Progressing", message)
end

if state == "Pending" then
  if why ~= nil and needsPerson[status.reason] then
    return result("Degraded", describe(why, "the run cannot start"))
  end
  -- Unschedulable stays Progressing on purpose: GPU jobs wait for capacity (autoscaler, Kueue, other
  -- runs finishing) as a matter of course. The scheduler's message says what is missing.
  if why ~= nil and status.reason ~= "Starting" then
    return result("Progressing", "pending: " .. describe(why, "waiting for the trainer pods"))
  end
  if condition(status, "Scheduled") ~= nil then
    return result("Progressing", "pending: trainer pods are scheduled and starting")
  end
  return result("Progressing", "pending: waiting for the trainer pods")
end

return result("Unknown", "unknown state " .. tostring(state))
