-- Orthanc auto-routing to the cxrlt DICOM node (`cxrlt dicom-node`).
--
-- Every chest radiograph (CR or DX image whose BodyPartExamined is empty or a chest term) that
-- Orthanc stores is sent to the DicomModalities entry named NODE. Nothing else is sent: in
-- particular not the node's own results (Structured Reports, modality SR), so an SR stored back
-- into the study never loops to the node, and nothing the node itself stored is routed again.
-- The node applies the same rules on its side and derives the SR's UID from the image's, so a
-- re-sent image gives the same SR, which Orthanc stores once.
--
-- Install: copy this file next to orthanc.json, list it in "LuaScripts", declare NODE in
-- "DicomModalities" (see cxrlt.json beside this file) and restart Orthanc.

local NODE = 'CXRLT'                          -- the key of the node in "DicomModalities"
local NODE_AET = 'CXRLT'                      -- the node's AE title (its --ae-title)
local MODALITIES = { CR = true, DX = true }   -- what the node classifies
local CHEST = { 'CHEST', 'THORAX', 'TORAX', 'LUNG', 'PECHO', 'TORACE' }

local function IsChest(bodyPart)
   if bodyPart == nil or bodyPart == '' then
      return true                             -- many modalities leave it empty
   end
   bodyPart = string.upper(bodyPart)
   for _, term in ipairs(CHEST) do
      if string.find(bodyPart, term, 1, true) then
         return true
      end
   end
   return false
end

function OnStoredInstance(instanceId, tags, metadata, origin)
   if origin ~= nil and origin['RemoteAet'] == NODE_AET then
      return                                  -- the node's own SR: never back to the node
   end
   if not MODALITIES[tags['Modality'] or ''] then
      return                                  -- SR, PR, KO, CT ...: not for the node
   end
   if not IsChest(tags['BodyPartExamined']) then
      return
   end
   SendToModality(instanceId, NODE)
end
