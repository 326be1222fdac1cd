-- Argo CD health check for kubetune.io/FineTuneJob.
-- Installed as argocd-cm key resource.customizations.health.kubetune.io_FineTuneJob (argocd-cm-patch.yaml
-- holds a copy of this file; tests/test_gitops.py checks that they are identical).
--
-- Argo CD runs it in gopher-lua (Lua 5.1) with only the base, table and a safe os library loaded: no
-- string or math functions and no string methods, so this script uses `..`, tostring and table.concat.
--
--   no status yet, or status older than the spec  Progressing  waiting for the operator
--   Pending (also Unschedulable)                  Progressing  a queued GPU job is normal, not a failure
--   Suspended by runPolicy.suspend                Suspended
--   Suspended otherwise (queued in Kueue)         Progressing  waiting for admission
--   Running                                       Progressing  "running: 37% loss 1.2346 eta 1h12m"
--   Succeeded                                     Healthy
--   Failed (InvalidSpec, BackoffLimitExceeded...) Degraded     "<reason>: <message>"

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
  if runPolicy.suspend == true then
    local message = "suspended by runPolicy.suspend; resumes from its last checkpoint"
    if status.progress ~= nil then
      message = message .. " (at " .. status.progress .. ")"
    end
    return result("Suspended", message)
  end
  -- Not suspended by the spec: a queue controller holds the Job until it admits it, which is waiting.
  if runPolicy.queueName ~= nil then
    return result("Progressing",
      "queued: waiting for Kueue to admit the Job (LocalQueue " .. runPolicy.queueName .. ")")
  end
  return result("Progressing", "queued: the trainer Job is suspended until a queue controller admits it")
end

local scheduled = condition(status, "Scheduled")
local unschedulable = scheduled ~= nil and scheduled.status == "False"

if state == "Running" then
  local parts = {}
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
  if unschedulable then
    message = message .. "; " .. describe(scheduled, "some trainer pods are unschedulable")
  end
  return result("Progressing", message)
end

if state == "Pending" then
  -- Unschedulable stays Progressing on purpose: GPU jobs wait for capacity (autoscaler, Kueue, other
  -- runs finishing) as a matter of course. The scheduler's message says what is missing.
  if unschedulable then
    return result("Progressing", "pending: " .. describe(scheduled, "no node fits the trainer pods"))
  end
  if scheduled ~= nil then
    return result("Progressing", "pending: trainer pods are scheduled and starting")
  end
  return result("Progressing", "pending: waiting for the trainer pods")
end

return result("Unknown", "unknown state " .. tostring(state))
